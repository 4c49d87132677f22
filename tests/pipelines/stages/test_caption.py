"""The caption stage on the downloaded stage world, with real Ray and a randomly initialised tiny BLIP."""

import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch

from pipelines.cli.main import main as cli_main
from pipelines.manifests.images import ImageStore, ShardUnavailableError
from pipelines.manifests.manifest import Generation, ManifestError, generation_counts, read_part
from pipelines.stages import caption, shards
from pipelines.stages.caption import CaptionConfig, run_caption
from vlp_core.checkpoint import WEIGHTS_FILE, file_digest

WEB_SHARDS = ["00000", "00001", "00002", "00003"]  # the stage world's 40 URLs, 10 per shard
SHARDS = [*WEB_SHARDS, "refused"]


@pytest.fixture
def config(tiny_blip_checkpoint: Path) -> CaptionConfig:
    return CaptionConfig(tiny_blip_checkpoint, num_captions=3, min_length=2, max_length=8, batch_size=4)


def _corrupt_one_image(web: Generation) -> str:
    """Point one downloaded web row of shard 00000 at bytes that are not an image; returns its image_id."""
    garbage = web.path.parent / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    part = read_part(web.part_path("00000"))
    rows = part.to_pylist()
    victim = next(row for row in rows if row["kept"])
    victim["image_ref"] = str(garbage)
    web.write_part("download", "00000", pa.Table.from_pylist(rows, schema=part.schema), {})
    return victim["image_id"]


def _synthetic_by_image(table) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for row in table.to_pylist():
        if row["caption_source"] == "synthetic":
            captions.setdefault(row["image_id"], []).append(row["caption"])
    return captions


def test_web_rows_are_copied_and_each_image_gets_its_synthetic_captions(web_gen0, config, tiny_blip_checkpoint, caplog):
    broken = _corrupt_one_image(web_gen0)
    target = Generation(web_gen0.root, "world", 1)
    caplog.set_level(logging.INFO, logger=shards.__name__)
    counts = run_caption(config, web_gen0, target)
    table = target.read_samples()
    assert counts == generation_counts([table])

    web_rows = {row["image_id"]: row for row in web_gen0.read_samples().to_pylist()}
    rows = table.to_pylist()
    assert len({row["sample_id"] for row in rows}) == len(rows), "every sample_id exactly once"
    assert all(row["generation"] == 1 and row["parent_generation"] == 0 for row in rows)
    copied = [row for row in rows if row["caption_source"] == "web"]
    assert sorted(row["image_id"] for row in copied) == sorted(web_rows)
    for row in copied:
        before = web_rows[row["image_id"]]
        assert (row["caption"], row["image_ref"], row["sample_id"]) == (
            before["caption"],
            before["image_ref"],
            before["sample_id"],
        )
        if row["image_id"] == broken:
            assert (row["kept"], row["reject_stage"], row["reject_reason"]) == (False, "caption", "not_an_image")
            assert "not a recognised image" in row["reject_detail"]
        else:
            assert (row["kept"], row["reject_stage"]) == (before["kept"], before["reject_stage"])

    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    per_image = Counter(row["image_id"] for row in synthetic)
    downloaded = {i for i, row in web_rows.items() if row["kept"]} - {broken}
    assert set(per_image) == downloaded, "synthetic rows for every decodable downloaded image, and only those"
    assert all(1 <= n <= config.num_captions for n in per_image.values())
    assert sum(per_image.values()) > 0.9 * config.num_captions * len(downloaded)
    digest = file_digest(tiny_blip_checkpoint / WEIGHTS_FILE)
    for row in synthetic:
        web = web_rows[row["image_id"]]
        assert [row[k] for k in ("image_ref", "image_sha256", "width", "height")] == [
            web[k] for k in ("image_ref", "image_sha256", "width", "height")
        ]
        assert row["kept"] and row["model_ref"] == digest and row["caption"].strip()

    for shard in SHARDS:
        assert target.is_done("caption", shard)
    stats = json.loads(target.marker_path("caption", "00000").read_text())
    assert stats["decode_failures"] == 1 and stats["model_ref"] == digest

    logged = [record.args for record in caplog.records if isinstance(record.args, tuple) and record.args]
    (summary,) = [args[-1] for args in logged if isinstance(args[-1], shards.Throughput)]
    assert summary.images == len(downloaded) + 1  # the broken image went through an actor too
    assert summary.seconds > 0 and 0 < summary.model_busy <= 1 and "images/s" in str(summary)


def test_captions_do_not_depend_on_batching_and_a_rerun_skips_finished_shards(web_gen0, config):
    target, other = Generation(web_gen0.root, "world", 1), Generation(web_gen0.root, "world", 2)
    run_caption(config, web_gen0, target)
    run_caption(dataclasses.replace(config, batch_size=1, concurrency=2), web_gen0, other)
    first = target.read_samples()
    assert _synthetic_by_image(first) == _synthetic_by_image(other.read_samples())

    parts = {shard: target.part_path(shard).stat().st_mtime_ns for shard in SHARDS}
    run_caption(dataclasses.replace(config, seed=1), web_gen0, target)
    assert target.read_samples().equals(first), "marked shards are not captioned again, whatever the config"
    assert {shard: target.part_path(shard).stat().st_mtime_ns for shard in SHARDS} == parts


def test_waves_of_shards_give_the_same_rows_and_build_requests_only_for_the_wave(web_gen0, config, monkeypatch):
    """One shard per wave: a shard's requests are built only after the shards before it are committed,
    so the driver never holds a whole generation's requests; the rows equal a one-wave run's."""
    whole = Generation(web_gen0.root, "world", 1)
    run_caption(config, web_gen0, whole)
    events = []
    requests, commit = caption._Captioning.requests, shards.commit_shard

    def recorded_requests(self, shard):
        events.append(("requests", shard))
        return requests(self, shard)

    def recorded_commit(target, stage, shard, *rest):
        events.append(("commit", shard))
        return commit(target, stage, shard, *rest)

    monkeypatch.setattr(caption._Captioning, "requests", recorded_requests)
    monkeypatch.setattr(shards, "commit_shard", recorded_commit)
    monkeypatch.setattr(shards, "WAVE_IMAGES", 1)
    waves = Generation(web_gen0.root, "world", 2)
    run_caption(config, web_gen0, waves)
    assert events == [(event, shard) for shard in sorted(SHARDS) for event in ("requests", "commit")]
    numbers = ["generation", "parent_generation"]
    assert waves.read_samples().drop_columns(numbers).equals(whole.read_samples().drop_columns(numbers))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_manifest(
    ray_local, web_gen0, tiny_blip_checkpoint, kill_midway, tmp_path
):
    """Killed on Ray, resumed with the local executor: the same manifest as an uninterrupted run."""
    slow = CaptionConfig(
        tiny_blip_checkpoint,
        num_captions=10,
        min_length=20,
        max_length=20,
        batch_size=2,
        executor="ray",
        ray_address=ray.get_runtime_context().gcs_address,
    )
    killed = Generation(web_gen0.root, "world", 1)
    kwargs = {**dataclasses.asdict(slow), "checkpoint": str(tiny_blip_checkpoint)}
    code = (
        "import json; from pathlib import Path\n"
        "from pipelines.stages.caption import CaptionConfig, run_caption\n"
        "from pipelines.manifests.manifest import Generation\n"
        f"root = Path({str(web_gen0.root)!r})\n"
        f"run_caption(CaptionConfig(**json.loads({json.dumps(kwargs)!r})), Generation(root, 'world', 0), "
        "Generation(root, 'world', 1))\n"
    )
    finished = kill_midway(code, killed, "caption", WEB_SHARDS)
    killed.marker_path("caption", finished[0]).unlink()  # as if killed between a part's rename and its marker

    local = dataclasses.replace(slow, executor="local")
    run_caption(local, web_gen0, killed)
    other_root = tmp_path / "uninterrupted"
    shutil.copytree(web_gen0.path, Generation(other_root, "world", 0).path)
    run_caption(local, Generation(other_root, "world", 0), Generation(other_root, "world", 1))
    resumed, uninterrupted = killed.read_samples(), Generation(other_root, "world", 1).read_samples()
    assert len(set(resumed["sample_id"].to_pylist())) == resumed.num_rows
    assert resumed.to_pylist() == uninterrupted.to_pylist()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_lost_shard_tar_stops_the_stage_and_a_rerun_after_restoring_it_redoes_it(web_gen0, config, damage):
    """A shard archive gone from storage is not a shard of missing images: nothing of it is marked done."""
    tar = web_gen0.path / "shards" / "00001.tar"
    saved = tar.read_bytes()
    tar.unlink() if damage == "missing" else tar.write_bytes(saved[: len(saved) // 3])
    target = Generation(web_gen0.root, "world", 1)
    with pytest.raises(ShardUnavailableError, match="00001.tar: shard"):
        run_caption(config, web_gen0, target)
    assert not target.is_done("caption", "00001")
    tar.write_bytes(saved)
    run_caption(config, web_gen0, target)
    assert "missing_file" not in target.read_samples()["reject_reason"].to_pylist()
    assert all(target.is_done("caption", shard) for shard in WEB_SHARDS)


@pytest.mark.slow
def test_a_lost_shard_tar_under_ray_is_one_line_and_exit_2(ray_local, web_gen0, tiny_blip_checkpoint, capsys):
    """The error is raised in a Ray Data actor; the command prints the original message, not Ray's traceback."""
    (web_gen0.path / "shards" / "00001.tar").unlink()
    argv = ["caption", "--root", str(web_gen0.root), "--dataset", "world", "--generation", "1"]
    argv += ["--checkpoint", str(tiny_blip_checkpoint), "--num-captions", "2", "--max-length", "6"]
    argv += ["--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address]
    assert cli_main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("capfilt caption: error: ") and "00001.tar: shard missing or unreadable" in last
    assert "Traceback" not in last and "RayTaskError" not in last and "UserCodeException" not in last
    assert _cpus_freed(), "the stopped stage's actors still hold CPUs (later Ray work would wait for them)"


def _cpus_freed(seconds: float = 30.0) -> bool:
    """Whether every CPU of the Ray cluster is free again within `seconds`."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_another_dataset_of_the_root_gets_the_same_captions_with_image_refs_back_to_the_web(web_gen0, config):
    """The candidates of a second captioner in an ablation live beside the web dataset, not in it."""
    same, beside = Generation(web_gen0.root, "world", 1), Generation(web_gen0.root, "world-other", 1)
    run_caption(config, web_gen0, same)
    run_caption(config, web_gen0, beside)
    rows = {row["sample_id"]: row for row in same.read_samples().to_pylist()}
    moved = beside.read_samples().to_pylist()
    assert sorted(row["sample_id"] for row in moved) == sorted(rows)
    with_images = [row for row in moved if row["image_ref"]]
    assert with_images and all(
        row["image_ref"] == "../world/" + rows[row["sample_id"]]["image_ref"] for row in with_images
    )
    assert all(ImageStore(beside.path.parent).read(row["image_ref"]) for row in with_images[:5])


def test_bad_config_and_targets_fail_before_any_work(web_gen0, tiny_blip_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="CaptionConfig: top_p must be in"):
        CaptionConfig(tiny_blip_checkpoint, top_p=0)
    with pytest.raises(ValueError, match="min_length must be in"):
        CaptionConfig(tiny_blip_checkpoint, min_length=9, max_length=8)
    with pytest.raises(ValueError, match="is not a model folder"):
        CaptionConfig(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        CaptionConfig(tiny_blip_checkpoint, concurrency=0)
    config = CaptionConfig(tiny_blip_checkpoint)
    with pytest.raises(ManifestError, match="under the same manifest root"):
        run_caption(config, web_gen0, Generation(tmp_path / "elsewhere", "world", 1))
    with pytest.raises(ManifestError, match="no parts"):
        run_caption(config, Generation(tmp_path, "empty", 0), Generation(tmp_path, "empty", 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_shards_caption_on_cuda(web_gen0, config):
    """The caption stage's actor on a GPU (the local executor: no Ray on a bare GPU machine)."""
    on_gpu = dataclasses.replace(config, num_gpus=1, executor="local")
    target = Generation(web_gen0.root, "world", 1)
    run_caption(on_gpu, web_gen0, target)
    rows = target.read_samples().to_pylist()
    synthetic = [row for row in rows if row["caption_source"] == "synthetic"]
    downloaded = {row["image_id"] for row in web_gen0.read_samples().to_pylist() if row["kept"]}
    assert {row["image_id"] for row in synthetic} == downloaded and all(row["caption"] for row in synthetic)
