"""The shared pieces of the inference stages, in process (no Ray, no model)."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.manifests.manifest import Generation, ManifestError, samples_table
from pipelines.stages.actors import DECODED_SCHEMA, RESULT_FIELDS, ImageDecoder, ImageModelActor
from pipelines.stages.shards import (
    ActorPoolConfig,
    caption_requests,
    commit_shard,
    image_requests,
    image_seed,
    scores_by_sample,
    shards_finished_by,
    undo_from,
)


def _row(sample_id: str, image_id: str = "img-1", **fields) -> dict:
    row = {
        "sample_id": sample_id,
        "image_id": image_id,
        "image_ref": f"{image_id}.png",
        "caption": "a red circle",
        "kept": True,
        "reject_stage": None,
        "reject_reason": None,
        "reject_detail": None,
        "itm_score": None,
        "itc_score": None,
        "clip_score": None,
        "clip_rank": None,
    }
    return {**row, **fields}


def test_undo_from_lifts_the_stage_and_later_ones_only():
    rows = [
        _row("a", kept=False, reject_stage="download", reject_reason="http_404"),
        _row("b", kept=False, reject_stage="filter", reject_reason="itm_below_threshold", itm_score=0.1),
        _row(
            "c", kept=False, reject_stage="rank", reject_reason="clip_rank", itm_score=0.9, clip_score=0.2, clip_rank=2
        ),
        _row("d", itm_score=0.8, clip_score=0.3, clip_rank=0),
    ]
    before_rank = undo_from(rows, "rank")
    assert [r["kept"] for r in before_rank] == [False, False, True, True]
    assert [r["itm_score"] for r in before_rank] == [None, 0.1, 0.9, 0.8], "the filter's scores stay"
    assert all(r["clip_score"] is None and r["clip_rank"] is None for r in before_rank)
    before_filter = undo_from(rows, "filter")
    assert [r["kept"] for r in before_filter] == [False, True, True, True]
    assert all(r["itm_score"] is None for r in before_filter)
    assert before_filter[0]["reject_reason"] == "http_404" and before_filter[1]["reject_reason"] is None


def test_requests_group_candidates_by_image_and_skip_what_cannot_be_scored():
    rows = [
        _row("a", "img-1"),
        _row("b", "img-2", caption="<b> </b>"),
        _row("c", "img-1", caption="a <i>blue</i> square"),
        _row("d", "img-3", kept=False),
        _row("e", "img-2"),
        _row("f", "img-4", image_ref=None),
    ]
    requests = caption_requests("00007", rows, max_chars=100).to_pylist()
    assert [(r["image_id"], r["sample_ids"], r["texts"]) for r in requests] == [
        ("img-1", ["a", "c"], ["a red circle", "a blue square"]),
        ("img-2", ["e"], ["a red circle"]),
    ]
    assert {r["shard"] for r in requests} == {"00007"}
    images_only = image_requests("00007", rows[:3]).to_pylist()
    assert [(r["image_id"], r["sample_ids"]) for r in images_only] == [("img-1", []), ("img-2", [])]


def test_image_seed_is_stable_and_differs_per_image_and_seed():
    assert image_seed(0, "web-000000001") == image_seed(0, "web-000000001")
    seeds = {image_seed(s, f"web-{i:09d}") for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)


def test_scores_by_sample_skips_failed_images():
    results = [
        {"sample_ids": ["a", "b"], "itm": [0.25, 0.75], "error_reason": None},
        {"sample_ids": ["c"], "itm": None, "error_reason": "truncated"},
    ]
    assert scores_by_sample(results, "itm") == {"a": 0.25, "b": 0.75}


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_score_stops_the_stage(score):
    results = [{"sample_ids": ["a", "b"], "clip": [0.25, score], "error_reason": None, "model_ref": "sha256:0f"}]
    with pytest.raises(ValueError, match=r"sample b the clip score .*non-finite scores mean broken weights"):
        scores_by_sample(results, "clip")


def test_commit_invalidates_later_stages_before_replacing_the_part(tmp_path: Path):
    target = Generation(tmp_path, "world", 1)
    for stage in ("caption", "filter", "rank"):
        target.mark_done(stage, "00000", {})
    rows = samples_table({"image_id": ["img-1"], "caption": ["a"], "caption_source": ["web"], "generation": [1]})
    commit_shard(target, "filter", "00000", rows, {"kept": 1})
    assert target.is_done("caption", "00000") and target.is_done("filter", "00000")
    assert not target.is_done("rank", "00000")
    assert target.read_samples().equals(rows)
    assert shards_finished_by(target, "filter") == ["00000"]
    with pytest.raises(ManifestError, match="the rank stage has not finished shard"):
        shards_finished_by(target, "rank")
    target.write_part("assemble", "human", rows, {})  # assemble's part: no caption marker, not a candidate
    assert shards_finished_by(target, "filter") == ["00000"]
    with pytest.raises(ManifestError, match="no captioned shards; run the caption stage"):
        shards_finished_by(Generation(tmp_path, "world", 2), "filter")


def test_pool_config_is_validated():
    with pytest.raises(ValueError, match="ActorPoolConfig: batch_size must be >= 1"):
        ActorPoolConfig(batch_size=0)
    with pytest.raises(ValueError, match="num_gpus must be >= 0"):
        ActorPoolConfig(num_gpus=-1)
    assert ActorPoolConfig(num_gpus=0.5).device == "cuda" and ActorPoolConfig().device == "cpu"
    assert (ActorPoolConfig().batch_size, ActorPoolConfig(num_gpus=1).batch_size) == (32, 256), "GPUs get bigger calls"
    assert ActorPoolConfig(num_gpus=1, batch_size=8).batch_size == 8


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


class _MeanColourActor(ImageModelActor):
    """A stand-in model: the mean of each image, so the test can see which image went where."""

    output_fields = [pa.field("means", pa.list_(pa.float32()))]

    def __init__(self, config: ActorPoolConfig) -> None:
        self.model_ref = "test:mean"
        self.batches: list[int] = []

    @classmethod
    def image_transform(cls, config: ActorPoolConfig):
        return _pixels

    def infer(self, pixels, requests):
        self.batches.append(len(pixels))
        return [{"means": [float(image.mean())] * len(r["sample_ids"])} for image, r in zip(pixels, requests)]


def test_each_image_is_decoded_once_and_failures_reach_the_results(tmp_path: Path):
    for name, value in (("grey.png", 100), ("white.png", 255)):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (value, value, value)).save(buffer, format="PNG")
        (tmp_path / name).write_bytes(buffer.getvalue())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [_row("a", "grey"), _row("b", "grey"), _row("c", "broken"), _row("d", "white"), _row("e", "gone")]
    for row in rows:
        row["image_ref"] = f"{row['image_id']}.png"
    decoded = ImageDecoder(tmp_path, _pixels)(caption_requests("00000", rows, max_chars=100))
    assert decoded.column_names == DECODED_SCHEMA.names and decoded["pixel_shape"][0].as_py() == [3, 4, 4]
    actor = _MeanColourActor(ActorPoolConfig())
    results = actor(decoded).to_pylist()
    assert actor.batches == [2], "two decodable images, one model call"
    by_image = {r["image_id"]: r for r in results}
    assert by_image["grey"]["means"] == [100.0, 100.0] and by_image["white"]["means"] == [255.0]
    assert (by_image["broken"]["error_reason"], by_image["broken"]["means"]) == ("not_an_image", None)
    assert by_image["gone"]["error_reason"] == "missing_file" and "gone.png" in by_image["gone"]["error_detail"]
    assert {r["model_ref"] for r in results} == {"test:mean"}
    assert by_image["grey"]["model_seconds"] == by_image["white"]["model_seconds"] > 0  # one call, shared
    assert by_image["broken"]["model_seconds"] == by_image["gone"]["model_seconds"] == 0.0
    assert [f.name for f in RESULT_FIELDS] == list(results[0])[: len(RESULT_FIELDS)]


class _SmallGpuActor(_MeanColourActor):
    """A model that runs out of GPU memory on more than `fits` images at once."""

    fits = 2

    def infer(self, pixels, requests):
        if len(pixels) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return super().infer(pixels, requests)


def test_a_call_that_runs_out_of_gpu_memory_is_split_until_it_fits(tmp_path: Path, caplog):
    rows = []
    for index in range(5):
        buffer = io.BytesIO()
        Image.new("RGB", (2, 2), (index, index, index)).save(buffer, format="PNG")
        (tmp_path / f"{index}.png").write_bytes(buffer.getvalue())
        rows.append(_row(f"s{index}", f"{index}", image_ref=f"{index}.png"))
    decoded = ImageDecoder(tmp_path, _pixels)(caption_requests("00000", rows, max_chars=100))
    actor = _SmallGpuActor(ActorPoolConfig())
    results = actor(decoded).to_pylist()
    assert [result["means"] for result in results] == [[float(index)] for index in range(5)], "every image, in order"
    assert actor.batches == [2, 1, 2] and "out of GPU memory on 5 images" in caplog.text
    actor.fits = 0
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit is the error it is
        actor(decoded)
