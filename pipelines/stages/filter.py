"""Filter stage: BLIP's ITM head keeps the web and synthetic captions that match their image.

Scoring and deciding are separate. Scoring stores, for every candidate (a kept row with an image and a
caption that is not empty once cleaned), the ITM match probability (`itm_score`) and the ITC
similarity (`itc_score`) from the filter checkpoint; each image is encoded once for all its candidates.
Deciding keeps a row when `itm_score >= threshold`, else rejects it (`filter/itm_below_threshold`); a
caption that cleans to nothing is rejected as `filter/empty_caption` without scoring.

`rethreshold` re-decides from the stored scores without loading a model, and `run_filter` on shards
that are already scored does the same. A changed decision invalidates the shard's rank marker.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, read_part
from pipelines.stages.shards import (
    DEFAULT_MAX_CAPTION_CHARS,
    ActorPoolConfig,
    CaptionScoringStage,
    ImageModelActor,
    Row,
    captioned_shards,
    check_config,
    commit_shard,
    model_text,
    rejected,
    rows_table,
    run_sharded_inference,
    scores_by_sample,
    shards_finished_by,
    undo_from,
)
from vlp_core.checkpoint import FILTER_NEEDS, check_checkpoint, checkpoint_digest, load_checkpoint
from vlp_core.data import image_transform
from vlp_core.scoring import score_captions

STAGE = registry.FILTER.name


def _check_threshold(threshold: float) -> tuple[bool, str]:
    return 0.0 <= threshold <= 1.0, f"threshold is an ITM probability and must be in [0, 1], got {threshold}"


@dataclass(frozen=True)
class FilterConfig(ActorPoolConfig):
    """The filter checkpoint and the ITM probability a caption needs to be kept."""

    checkpoint: Path
    threshold: float = 0.5
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS  # captions are cleaned and cut to this before scoring

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(
            type(self).__name__,
            [
                (Path(self.checkpoint).is_dir(), f"checkpoint {self.checkpoint} is not a checkpoint folder"),
                _check_threshold(self.threshold),
                (self.max_caption_chars >= 1, f"max_caption_chars must be >= 1, got {self.max_caption_chars}"),
            ],
        )
        # a bad or wrong model stops here, before any work
        check_checkpoint(self.checkpoint, FILTER_NEEDS, "the filter stage")


class FilterActor(ImageModelActor):
    """Holds one filter model; scores each image's candidates (ITM probability, ITC similarity)."""

    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("itm", pa.list_(pa.float32())),
        pa.field("itc", pa.list_(pa.float32())),
    ]

    def __init__(self, config: FilterConfig, dataset_dir: Path) -> None:
        super().__init__(dataset_dir)
        self.model, self.tokenizer, self.model_ref = load_checkpoint(config.checkpoint, config.device)
        self.transform = image_transform(self.model.config, train=False)

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        scores = score_captions(self.model, self.tokenizer, pixels, [request["texts"] for request in requests])
        return [{"itm": image_scores.itm, "itc": image_scores.itc} for image_scores in scores]


def decide(row: Row, threshold: float) -> Row:
    """The verdict on a scored row: kept when its ITM probability reaches the threshold."""
    if row["itm_score"] >= threshold:
        return {**row, "kept": True, "reject_stage": None, "reject_reason": None, "reject_detail": None}
    return rejected(row, STAGE, "itm_below_threshold")


def _stats(rows: list[Row], threshold: float, model_ref: str | None) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "scored": sum(row["itm_score"] is not None for row in rows),
        "kept": sum(row["kept"] for row in rows),
        "rejected": dict(Counter(row["reject_reason"] for row in rows if row["reject_stage"] == STAGE)),
        "threshold": threshold,
        "model_ref": model_ref,
    }


@dataclass(frozen=True)
class _Filtering(CaptionScoringStage):
    config: FilterConfig
    name: ClassVar[str] = STAGE
    actor_class: ClassVar[type[ImageModelActor]] = FilterActor

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        itm, itc = scores_by_sample(results, "itm"), scores_by_sample(results, "itc")
        failed = {result["image_id"]: result for result in results if result["error_reason"]}
        rows = []
        for row in self.rows(shard):
            if not row["kept"]:
                rows.append(row)
            elif row["sample_id"] in itm:
                scored = {**row, "itm_score": itm[row["sample_id"]], "itc_score": itc[row["sample_id"]]}
                rows.append(decide(scored, self.config.threshold))
            elif row["image_id"] in failed:
                failure = failed[row["image_id"]]
                rows.append(rejected(row, STAGE, failure["error_reason"], failure["error_detail"]))
            elif model_text(row["caption"], self.config.max_caption_chars) is None:
                rows.append(rejected(row, STAGE, "empty_caption"))
            else:  # no image to score it against
                rows.append(row)
        model_ref = results[0]["model_ref"] if results else None
        return rows_table(rows), _stats(rows, self.config.threshold, model_ref)


def _redecide_shard(target: Generation, shard: str, threshold: float, model_ref: str | None = None) -> None:
    """Re-decide a scored shard from its stored scores; rewrites it only when the threshold changed.
    With `model_ref`, refuses scores that another filter checkpoint produced."""
    marker = json.loads(target.marker_path(STAGE, shard).read_text())
    if model_ref is not None and marker["model_ref"] not in (None, model_ref):
        raise ManifestError(
            f"{target.path}: shard {shard} was scored by filter {marker['model_ref']}, not by the given checkpoint "
            f"({model_ref}); filter into a new generation, or delete {target.marker_path(STAGE, '*')} to re-score"
        )
    if marker["threshold"] == threshold:
        return
    rows = undo_from(read_part(target.part_path(shard)).to_pylist(), "rank")  # rank's view will be stale
    rows = [decide(row, threshold) if row["itm_score"] is not None else row for row in rows]
    commit_shard(target, STAGE, shard, rows_table(rows), _stats(rows, threshold, marker["model_ref"]))


def rethreshold(target: Generation, threshold: float) -> dict[str, Any]:
    """Re-decide every shard of a filtered generation at `threshold` from the stored scores (no model is
    loaded); returns the target's `generation_counts`. Shards whose decision changed must be ranked again."""
    ok, message = _check_threshold(threshold)
    if not ok:
        raise ValueError(message)
    with target.writer(STAGE):
        shards = shards_finished_by(target, STAGE)
        _check_parts(target, shards)
        for shard in shards:
            _redecide_shard(target, shard, threshold)
        return target.counts()


def _check_parts(target: Generation, shards: list[str]) -> None:
    """Read every part that a re-decision may rewrite, so that a bad one stops it before any write."""
    for shard in shards:
        read_part(target.part_path(shard))


def run_filter(config: FilterConfig, target: Generation) -> dict[str, Any]:
    """Score and decide every captioned shard of `target`; already scored shards are only re-decided
    at `config.threshold`. Returns the target's `generation_counts`."""
    with target.writer(STAGE):
        shards = captioned_shards(target)
        scored = [shard for shard in shards if target.is_done(STAGE, shard)]
        if scored:
            model_ref = checkpoint_digest(config.checkpoint)
            _check_parts(target, scored)
            for shard in scored:
                _redecide_shard(target, shard, config.threshold, model_ref)
        return run_sharded_inference(_Filtering(config, target), target, shards, config)
