"""The assemble stage on a small world's human set and a hand-made candidate generation."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipelines.manifests.manifest import Generation, ManifestError, generation_counts, samples_table
from pipelines.stages.assemble import AssembleConfig, run_assemble
from pipelines.world.generate import WorldConfig, WorldPaths, make_world
from vlp_core.data import CocoFormatError

N_HUMAN, CAPTIONS_PER_IMAGE = 6, 3
CHECKPOINTS = {"captioner": "sha256:aaaa", "filter": "sha256:bbbb", "clip": "sha256:cccc", "pretrained": "sha256:dddd"}
STAGES = ["caption", "filter", "rank"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    return make_world(
        tmp_path_factory.mktemp("world"),
        WorldConfig(seed=1, n_web=20, n_human=N_HUMAN, n_test=0, captions_per_image=CAPTIONS_PER_IMAGE),
    )


def candidate_generation(root: Path, finished: list[str] = STAGES) -> Generation:
    """Generation 1 after the `finished` stages: one web and two synthetic candidates of two images."""
    generation = Generation(root, "world", 1)
    generation.write_part(
        "caption",
        "00000",
        samples_table(
            {
                "image_id": ["web-000000000"] * 3 + ["web-000000001"] * 3,
                "caption": ["stock photo", "a red circle", "a blue circle", "a green star", "a star", "a big star"],
                "caption_source": ["web", "synthetic", "synthetic"] * 2,
                "generation": [1] * 6,
                "parent_generation": [0] * 6,
                "kept": [False, True, True, True, True, False],
                "reject_stage": ["filter", None, None, None, None, "rank"],
                "reject_reason": ["itm_below_threshold", None, None, None, None, "clip_rank"],
            }
        ),
        {},
    )
    for stage in finished:
        generation.mark_done(stage, "00000", {})
    return generation


def test_human_rows_and_lineage(world: WorldPaths, tmp_path: Path) -> None:
    generation = candidate_generation(tmp_path)
    config = AssembleConfig(world.human_annotations, world.human_root)
    counts = run_assemble(
        config,
        generation,
        parent=0,
        checkpoints=CHECKPOINTS,
        stages=STAGES,
        config_digest="sha256:1234",
        flow_run_id="run-7",
    )
    table = generation.read_samples()
    assert counts == generation.read_info()["counts"] == generation_counts([table])

    human = [row for row in table.to_pylist() if row["caption_source"] == "human"]
    annotations = json.loads(world.human_annotations.read_text())
    assert len(human) == N_HUMAN * CAPTIONS_PER_IMAGE == sum(len(a["caption"]) for a in annotations)
    expected_captions = {(f"human-{a['image_id']}", c) for a in annotations for c in a["caption"]}
    assert {(row["image_id"], row["caption"]) for row in human} == expected_captions
    for row in human:
        path = Path(row["image_ref"])
        image_name = row["image_id"].removeprefix("human-") + ".png"
        assert path.is_absolute() and path == (world.human_root / "images" / image_name).resolve()
        assert row["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (row["width"], row["height"]) == (64, 64)
        assert row["kept"] and row["generation"] == 1 and row["parent_generation"] == 0
    assert len({row["sample_id"] for row in human}) == len(human)

    info = generation.read_info()
    assert info["parent_generation"] == 0 and info["generation"] == 1
    assert info["stages"] == [*STAGES, "assemble"]
    assert info["checkpoints"] == CHECKPOINTS
    assert info["config_digest"] == "sha256:1234" and info["flow_run_id"] == "run-7"
    counts = info["counts"]
    assert counts["rows"] == 6 + 18 and counts["kept"] == 4 + 18
    assert counts["rows_by_source"] == {"human": 18, "synthetic": 4, "web": 2}
    assert counts["kept_by_source"] == {"human": 18, "synthetic": 3, "web": 1}
    assert counts["images_by_source"] == {"human": N_HUMAN, "synthetic": 2, "web": 2}
    assert counts["rejected_by_stage_reason"] == {"filter/itm_below_threshold": 1, "rank/clip_rank": 1}


def test_repeated_human_caption_is_stored_once(world: WorldPaths, tmp_path: Path) -> None:
    annotations = json.loads(world.human_annotations.read_text())
    annotations[0]["caption"].append(annotations[0]["caption"][0])
    repeated = tmp_path / "repeated.json"
    repeated.write_text(json.dumps(annotations))
    generation = candidate_generation(tmp_path)
    run_assemble(AssembleConfig(repeated, world.human_root), generation, 0, CHECKPOINTS, STAGES, "sha256:1")
    table = generation.read_samples()
    human_ids = [
        sid
        for sid, source in zip(table["sample_id"].to_pylist(), table["caption_source"].to_pylist())
        if source == "human"
    ]
    assert len(human_ids) == len(set(human_ids)) == N_HUMAN * CAPTIONS_PER_IMAGE


def test_rerun_keeps_the_human_part(world: WorldPaths, tmp_path: Path) -> None:
    generation = candidate_generation(tmp_path)
    config = AssembleConfig(world.human_annotations, world.human_root)
    first = run_assemble(config, generation, 0, CHECKPOINTS, STAGES, "sha256:1234")
    part = generation.part_path("human")
    written = part.stat().st_mtime_ns
    second = run_assemble(config, generation, 0, CHECKPOINTS, STAGES, "sha256:1234")
    assert part.stat().st_mtime_ns == written, "a finished part is not rewritten"
    assert second == first == generation.read_info()["counts"]
    assert first["rows"] == generation.read_samples().num_rows


def test_bad_annotation_names_the_entry_and_writes_nothing(world: WorldPaths, tmp_path: Path) -> None:
    annotations = json.loads(world.human_annotations.read_text())
    annotations[2]["caption"] = 42
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(annotations))
    generation = candidate_generation(tmp_path)
    with pytest.raises(CocoFormatError, match=r"bad\.json: entry 2: field 'caption'"):
        run_assemble(AssembleConfig(bad_json, world.human_root), generation, 0, CHECKPOINTS, STAGES, "sha256:1")
    assert not generation.part_path("human").exists()
    assert not generation.info_path.exists()
    assert not generation.is_done("assemble", "human")


def test_unreadable_human_image_is_a_rejected_row(world: WorldPaths, tmp_path: Path) -> None:
    image_root = tmp_path / "human"
    shutil.copytree(world.human_root, image_root)
    annotations = json.loads(world.human_annotations.read_text())
    (image_root / annotations[0]["image"]).write_bytes(b"<html>not an image</html>")
    (image_root / annotations[1]["image"]).unlink()
    generation = candidate_generation(tmp_path)
    run_assemble(AssembleConfig(world.human_annotations, image_root), generation, 0, CHECKPOINTS, STAGES, "sha256:1")
    table = generation.read_samples()
    rejected = {
        (row["image_id"], row["reject_reason"])
        for row in table.to_pylist()
        if row["caption_source"] == "human" and not row["kept"]
    }
    assert rejected == {
        (f"human-{annotations[0]['image_id']}", "not_an_image"),
        (f"human-{annotations[1]['image_id']}", "missing_file"),
    }
    assert generation.read_info()["counts"]["rejected_by_stage_reason"]["assemble/not_an_image"] == CAPTIONS_PER_IMAGE


def test_blank_human_captions_are_rejected_rows_not_kept_pairs(world: WorldPaths, tmp_path: Path) -> None:
    annotations = json.loads(world.human_annotations.read_text())
    annotations[0]["caption"] = ["", *annotations[0]["caption"]]
    annotations[1]["caption"][0] = " \t "
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps(annotations))
    generation = candidate_generation(tmp_path)
    run_assemble(AssembleConfig(blank, world.human_root), generation, 0, CHECKPOINTS, STAGES, "sha256:1")
    table = generation.read_samples()
    human = [row for row in table.to_pylist() if row["caption_source"] == "human"]
    rejected = [(row["caption"], row["reject_stage"], row["reject_reason"]) for row in human if not row["kept"]]
    assert sorted(rejected) == [("", "assemble", "empty_caption"), (" \t ", "assemble", "empty_caption")]
    assert sum(row["kept"] for row in human) == N_HUMAN * CAPTIONS_PER_IMAGE - 1  # one blank replaced a caption
    assert generation.read_info()["counts"]["rejected_by_stage_reason"]["assemble/empty_caption"] == 2


def test_config_and_arguments_fail_before_any_work(world: WorldPaths, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="human_annotations .* is not a file"):
        AssembleConfig(tmp_path / "missing.json", world.human_root)
    with pytest.raises(ValueError, match="human_image_root .* is not a folder"):
        AssembleConfig(world.human_annotations, tmp_path / "nowhere")
    config = AssembleConfig(world.human_annotations, world.human_root)
    with pytest.raises(ManifestError, match="no candidate parts"):
        run_assemble(config, Generation(tmp_path, "world", 3), 2, CHECKPOINTS, STAGES, "sha256:1")
    unranked = candidate_generation(tmp_path / "unranked", finished=["caption", "filter"])
    with pytest.raises(ManifestError, match=r"the rank stage has not finished shard\(s\) \['00000'\]"):
        run_assemble(config, unranked, 0, CHECKPOINTS, STAGES, "sha256:1")
    assert not unranked.part_path("human").exists()
    with pytest.raises(ValueError, match="non-empty digest"):
        run_assemble(config, candidate_generation(tmp_path), 0, {"filter": ""}, STAGES, "sha256:1")
