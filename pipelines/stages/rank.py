"""Rank stage: a CLIP model ranks each image's surviving captions and keeps the best `top_k`.

The candidates of an image are its rows still kept after the filter, web and synthetic together, scored
by the same CLIP (BLIP-2's recipe; Nguyen et al. 2023 apply one CLIP rule to raw and synthetic captions
alike). Each gets `clip_score` (cosine similarity) and `clip_rank` (0 = best; ties go to the smaller
sample_id); ranks from `top_k` on are rejected as `rank/clip_rank`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines import registry
from pipelines.manifests.manifest import Generation
from pipelines.stages.actors import ImageModelActor
from pipelines.stages.shards import (
    DEFAULT_MAX_CAPTION_CHARS,
    ActorPoolConfig,
    CaptionScoringStage,
    Row,
    check_config,
    rejected,
    rows_table,
    run_sharded_inference,
    scores_by_sample,
    shards_finished_by,
)
from vlp_core.checkpoint import file_digest, require_finite_file
from vlp_core.clip import clip_transform, load_clip
from vlp_core.data import PixelTransform
from vlp_core.storage import Location, location

log = logging.getLogger(__name__)

STAGE = registry.RANK.name


@dataclass(frozen=True)
class RankConfig(ActorPoolConfig):
    """The CLIP ranker (an open_clip architecture and its local weights) and how many captions to keep."""

    clip_model: str
    clip_checkpoint: Location | None  # None: an untrained CLIP (seeded, identical in every actor); for tests only
    top_k: int = 2
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(
            type(self).__name__,
            [
                (
                    self.clip_checkpoint is None or location(self.clip_checkpoint).is_file(),
                    f"clip_checkpoint {self.clip_checkpoint} is not a file",
                ),
                (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
                (self.max_caption_chars >= 1, f"max_caption_chars must be >= 1, got {self.max_caption_chars}"),
            ],
        )
        if self.clip_checkpoint is not None:  # NaN weights would rank every candidate NaN
            require_finite_file(self.clip_checkpoint)


class ClipActor(ImageModelActor):
    """Holds one CLIP (`config.clip_model`, `config.clip_checkpoint`); scores each image's candidates by
    cosine similarity, the image encoded once. The ranker's, and the filter's CLIP-score scorer."""

    output_fields: ClassVar[list[pa.Field]] = [pa.field("clip", pa.list_(pa.float32()))]

    def __init__(self, config: RankConfig) -> None:
        if config.clip_checkpoint is None:
            log.warning("no clip_checkpoint: scoring with an untrained %s", config.clip_model)
            torch.manual_seed(0)
            self.model_ref = f"untrained:{config.clip_model}"
        else:
            self.model_ref = file_digest(config.clip_checkpoint)
        self.ranker = load_clip(config.clip_model, config.clip_checkpoint, config.device)

    @classmethod
    def image_transform(cls, config: RankConfig) -> PixelTransform:
        return clip_transform(config.clip_model)

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        features = self.ranker.image_features(pixels)
        scores = self.ranker.scores(features, [request["texts"] for request in requests])
        return [{"clip": image_scores.tolist()} for image_scores in scores]


def ranks_by_image(rows: list[Row], scores: dict[str, float]) -> dict[str, int]:
    """sample_id -> rank among its image's scored rows (those in `scores`): best score first, ties by sample_id."""
    by_image: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["sample_id"] in scores:
            by_image[row["image_id"]].append(row["sample_id"])
    return {
        sample: rank
        for samples in by_image.values()
        for rank, sample in enumerate(sorted(samples, key=lambda s: (-scores[s], s)))
    }


def keep_top_k(rows: list[Row], clip_score: dict[str, float], top_k: int) -> list[Row]:
    """The rows with their `clip_score` and `clip_rank` set where scored; scored rows ranked `top_k` or
    worse among their image's are rejected as `rank/clip_rank`. Unscored rows are returned unchanged."""
    rank_of = ranks_by_image(rows, clip_score)
    ranked = []
    for row in rows:
        if row["sample_id"] in rank_of:
            row = {**row, "clip_score": clip_score[row["sample_id"]], "clip_rank": rank_of[row["sample_id"]]}
            row = rejected(row, STAGE, "clip_rank") if row["clip_rank"] >= top_k else row
        ranked.append(row)
    return ranked


@dataclass(frozen=True)
class _Ranking(CaptionScoringStage):
    config: RankConfig
    name: ClassVar[str] = STAGE
    actor_class: ClassVar[type[ImageModelActor]] = ClipActor

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        clip_score = scores_by_sample(results, "clip")
        failed = {result["image_id"]: result for result in results if result["error_reason"]}
        ranked = []
        for row in keep_top_k(self.rows(shard), clip_score, self.config.top_k):
            if row["kept"] and row["sample_id"] not in clip_score and row["image_id"] in failed:
                failure = failed[row["image_id"]]
                row = rejected(row, STAGE, failure["error_reason"], failure["error_detail"])
            ranked.append(row)
        stats = {
            "rows": len(ranked),
            "scored": len(clip_score),
            "kept": sum(row["kept"] for row in ranked),
            "rejected": dict(Counter(row["reject_reason"] for row in ranked if row["reject_stage"] == STAGE)),
            "top_k": self.config.top_k,
            "model_ref": results[0]["model_ref"] if results else None,
        }
        return rows_table(ranked), stats


def run_rank(config: RankConfig, target: Generation) -> dict[str, Any]:
    """CLIP-rank the filtered candidates of every shard of `target`; returns the target's rows."""
    shards = shards_finished_by(target, "filter")
    return run_sharded_inference(_Ranking(config, target), target, shards, config)
