"""The stages take released BLIP folders as they are (stand-ins: tests/released_models.py), through the
command line as a user runs them; a wrong or broken checkpoint stops a stage before it writes anything."""

import json
from pathlib import Path

import pytest
from released_models import released_captioner, released_filter

from flows.cli import main
from pipelines.manifests.manifest import Generation
from vlp_core.checkpoint import checkpoint_parts, file_digest


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("released")
    return {"captioner": released_captioner(folder / "captioner"), "filter": released_filter(folder / "filter")}


def _stage(command: str, generation: Generation, *options: str) -> int:
    return main(
        [
            command,
            "--root",
            str(generation.root),
            "--dataset",
            generation.dataset,
            "--generation",
            "1",
            "--batch-size",
            "20",
            *options,
        ]
    )


def test_caption_filter_and_rank_a_generation_with_released_models(web_gen0, released, tiny_clip_checkpoint, tmp_path):
    target = Generation(web_gen0.root, web_gen0.dataset, 1)
    assert (
        _stage(
            "caption",
            web_gen0,
            "--checkpoint",
            str(released["captioner"]),
            "--num-captions",
            "2",
            "--min-length",
            "1",
            "--max-length",
            "4",
        )
        == 0
    )
    assert _stage("filter", web_gen0, "--checkpoint", str(released["filter"])) == 0
    assert _stage("rank", web_gen0, "--clip-checkpoint", str(tiny_clip_checkpoint)) == 0
    rows = target.read_samples().to_pylist()
    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    assert len(synthetic) >= 20 and {row["model_ref"] for row in synthetic} == {
        file_digest(released["captioner"] / "model.safetensors")
    }
    scored = [row for row in rows if row["itm_score"] is not None]
    assert len(scored) >= 40 and all(0.0 <= row["itm_score"] <= 1.0 for row in scored)
    assert file_digest(released["filter"] / "model.safetensors") in target.marker_path("filter", "00000").read_text()
    assert _stage("filter", web_gen0, "--checkpoint", str(released["filter"]), "--threshold", "0.3") == 0
    assert json.loads(target.marker_path("filter", "00000").read_text())["threshold"] == 0.3  # re-decided, same model

    assert main(["import-hf", str(released["captioner"]), str(tmp_path / "captioner")]) == 0
    assert checkpoint_parts(tmp_path / "captioner") == checkpoint_parts(released["captioner"])


@pytest.mark.parametrize("command, role, message", [
    ("caption", "filter", "its lm_head is initialised at random, and the caption stage needs"),
    ("filter", "captioner", "its itc_projections and itm_head are initialised at random, and the filter stage needs"),
])  # fmt: skip
def test_a_model_given_for_the_wrong_stage_exits_2_before_writing(web_gen0, released, capsys, command, role, message):
    assert _stage(command, web_gen0, "--checkpoint", str(released[role])) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"capfilt {command}: error: {released[role]}") and message in error
    assert len(error.splitlines()) == 1
    assert not Generation(web_gen0.root, web_gen0.dataset, 1).path.exists()


def test_a_truncated_checkpoint_exits_2_before_writing(web_gen0, released, tmp_path, capsys):
    broken = tmp_path / "captioner"
    broken.mkdir()
    for path in released["captioner"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _stage("caption", web_gen0, "--checkpoint", str(broken)) == 2
    error = capsys.readouterr().err.strip()
    assert f"{weights}: not a readable safetensors file" in error and len(error.splitlines()) == 1
    assert not Generation(web_gen0.root, web_gen0.dataset, 1).path.exists()


def test_a_released_filter_is_evaluated_on_retrieval_without_caption_metrics(web_gen0, released, stage_world):
    argv = [
        "evaluate",
        "--root",
        str(web_gen0.root),
        "--dataset",
        web_gen0.dataset,
        "--generation",
        "0",
        "--checkpoint",
        str(released["filter"]),
        "--test-annotations",
        str(stage_world.test_annotations),
        "--test-image-root",
        str(stage_world.test_root),
        "--k-test",
        "4",
    ]
    assert main(argv) == 0
    evaluation = json.loads((web_gen0.path / "evaluation.json").read_text())
    assert evaluation["checkpoint"]["digest"] == file_digest(released["filter"] / "model.safetensors")
    assert 0.0 <= evaluation["retrieval"]["tr@1"] <= evaluation["retrieval"]["tr@5"] <= 1.0
    assert evaluation["captioning"] is None and evaluation["caption_examples"] == []
