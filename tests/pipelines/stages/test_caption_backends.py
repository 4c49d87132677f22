"""`capfilt caption --backend B --checkpoint DIR` with stand-ins of released BLIP-2, InstructBLIP, LLaVA and CoCa
folders: every synthetic caption records its backend, model digest and prompt, and a re-run writes the same."""

import json
from pathlib import Path

import pytest
from released_captioners import RELEASED_CAPTIONERS

from flows.cli import main
from pipelines.manifests.manifest import Generation
from vlp_core.captioners.vlm import KINDS
from vlp_core.checkpoint import file_digest

WEIGHTS = {"blip2": "model.safetensors", "instructblip": "model.safetensors", "llava": "model.safetensors",
           "coca": "open_clip_model.safetensors"}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("released-captioners")
    return {name: build(root / name) for name, build in RELEASED_CAPTIONERS.items()}


def caption(web: Generation, generation: int, *options: str) -> int:
    return main(
        ["caption", "--root", str(web.root), "--dataset", web.dataset, "--generation", str(generation),
         "--num-captions", "2", "--min-length", "1", "--max-length", "6", "--batch-size", "8", *options]
    )  # fmt: skip


def synthetic_rows(generation: Generation) -> list[dict]:
    return [row for row in generation.read_samples().to_pylist() if row["caption_source"] == "synthetic"]


@pytest.mark.parametrize("backend", sorted(RELEASED_CAPTIONERS))
def test_each_backend_captions_a_generation_and_the_manifest_says_which(backend, web_gen0, folders):
    folder = folders[backend]
    assert caption(web_gen0, 1, "--backend", backend, "--checkpoint", str(folder)) == 0
    rows = synthetic_rows(Generation(web_gen0.root, web_gen0.dataset, 1))
    downloaded = {row["image_id"] for row in web_gen0.read_samples().to_pylist() if row["kept"]}
    assert {row["image_id"] for row in rows} == downloaded
    prompt = KINDS[backend].default_prompt if backend in KINDS else None
    assert {(row["caption_backend"], row["caption_prompt"], row["model_ref"]) for row in rows} == {
        (backend, prompt, file_digest(folder / WEIGHTS[backend]))
    }
    marker = json.loads(Generation(web_gen0.root, web_gen0.dataset, 1).marker_path("caption", "00000").read_text())
    assert marker["backend"] == backend

    # at another batch size an image's draws are the same; its logits may round differently (the matrix
    # kernels depend on the batch), which can move a token drawn at the nucleus's edge (1 of 74 captions
    # of the random-weight CoCa on one CPU)
    assert caption(web_gen0, 2, "--backend", backend, "--checkpoint", str(folder), "--batch-size", "3") == 0
    again = synthetic_rows(Generation(web_gen0.root, web_gen0.dataset, 2))
    assert {row["image_id"] for row in again} == downloaded
    same = {row["sample_id"] for row in again} & {row["sample_id"] for row in rows}
    assert len(same) >= 0.95 * len(rows)


def test_the_prompt_is_the_users_and_is_recorded(web_gen0, folders):
    options = ["--backend", "instructblip", "--checkpoint", str(folders["instructblip"])]
    assert caption(web_gen0, 1, *options, "--prompt", "A photo of") == 0
    assert {row["caption_prompt"] for row in synthetic_rows(Generation(web_gen0.root, web_gen0.dataset, 1))} == {
        "A photo of"
    }


def test_a_folder_of_another_backend_exits_2_before_writing(web_gen0, folders, capsys):
    assert caption(web_gen0, 1, "--backend", "llava", "--checkpoint", str(folders["blip2"])) == 2
    assert "holds a 'blip-2' model" in capsys.readouterr().err
    assert caption(web_gen0, 1, "--backend", "blip3", "--checkpoint", str(folders["blip2"])) == 2
    assert "backend must be one of blip, blip2, instructblip, llava, coca" in capsys.readouterr().err
    assert not Generation(web_gen0.root, web_gen0.dataset, 1).path.exists()
