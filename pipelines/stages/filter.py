"""Filter stage: a scorer keeps the web and synthetic captions that match their image.

Two scorers, chosen per run (`SCORERS`):
- `itm` (BLIP's CapFilt, the default): the filter checkpoint's ITM match probability (`itm_score`, with the
  ITC similarity in `itc_score`);
- `clip` (DataComp / Nguyen et al. 2023): an open_clip model's image-caption cosine similarity
  (`filter_clip_score`), one cut for web and synthetic captions alike.

Scoring and deciding are separate. Scoring stores the scores of every candidate (a kept row with an image
and a caption that is not empty once cleaned); each image is encoded once for all its candidates.
Deciding keeps a row when its scorer's score reaches the threshold, else rejects it
(`filter/itm_below_threshold` or `filter/clip_below_threshold`: the reason names the scorer); a caption
that cleans to nothing is rejected as `filter/empty_caption` without scoring. With `best_per_image` N > 0,
an image keeps only its N best-scored captions of those that reach the threshold, web and synthetic
alike; the others are rejected as `filter/itm_outranked` (or `clip_outranked`).

`rethreshold` re-decides from the stored scores without loading a model, and `run_filter` on shards
that are already scored does the same. A changed decision invalidates the shard's rank marker.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import torch

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, read_part
from pipelines.stages.actors import ImageModelActor
from pipelines.stages.rank import ClipActor, ranks_by_image
from pipelines.stages.shards import (
    DEFAULT_MAX_CAPTION_CHARS,
    ActorPoolConfig,
    CaptionScoringStage,
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
from vlp_core.checkpoint import (
    FILTER_NEEDS,
    check_checkpoint,
    checkpoint_config,
    checkpoint_digest,
    file_digest,
    load_checkpoint,
    require_finite_file,
)
from vlp_core.data import ImageTransform, image_transform
from vlp_core.inference import for_inference
from vlp_core.scoring import score_captions
from vlp_core.storage import Location, location

STAGE = registry.FILTER.name


@dataclass(frozen=True)
class Scorer:
    """How the filter scores a caption: the manifest columns it fills (from its actor's outputs), the one
    it decides on, and what its threshold is."""

    name: str
    outputs: dict[str, str]  # manifest column -> the actor's output that fills it
    column: str  # the column the threshold applies to
    low: float  # the threshold's range
    high: float
    meaning: str

    @property
    def reject_reason(self) -> str:
        return f"{self.name}_below_threshold"

    @property
    def outranked_reason(self) -> str:
        return f"{self.name}_outranked"

    def scores(self, results: list[Row]) -> dict[str, dict[str, float]]:
        """Its columns' values by sample_id, from its actor's results (see `scores_by_sample`)."""
        return {column: scores_by_sample(results, output) for column, output in self.outputs.items()}

    def check_threshold(self, threshold: float) -> tuple[bool, str]:
        return (
            self.low <= threshold <= self.high,
            f"the {self.name} scorer's threshold is {self.meaning} and must be in [{self.low:g}, {self.high:g}], "
            f"got {threshold}",
        )


SCORERS = {
    scorer.name: scorer
    for scorer in (
        Scorer("itm", {"itm_score": "itm", "itc_score": "itc"}, "itm_score", 0.0, 1.0, "an ITM match probability"),
        Scorer("clip", {"filter_clip_score": "clip"}, "filter_clip_score", -1.0, 1.0, "a CLIP cosine similarity"),
    )
}


def is_scored(row: Row) -> bool:
    """Whether a filter scorer scored `row` (its image and caption were usable)."""
    return any(row[scorer.column] is not None for scorer in SCORERS.values())


@dataclass(frozen=True)
class FilterConfig(ActorPoolConfig):
    """The scorer, its model and the score a caption needs to be kept: the `itm` scorer reads a BLIP
    filter `checkpoint`; the `clip` scorer an open_clip `clip_model` with `clip_checkpoint` weights."""

    checkpoint: Location | None = None
    threshold: float = 0.5
    scorer: str = "itm"
    best_per_image: int = 0  # keep only each image's N best-scored captions that reach the threshold; 0: all
    clip_model: str | None = None
    clip_checkpoint: Location | None = None
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS  # captions are cleaned and cut to this before scoring

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_config(
            name, [(self.scorer in SCORERS, f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")]
        )
        if self.scorer == "itm":
            model = [(self.checkpoint is not None and location(self.checkpoint).is_dir(),
                      f"the itm scorer needs checkpoint, a filter folder; {self.checkpoint} is not one")]  # fmt: skip
        else:
            model = [
                (self.clip_model is not None, "the clip scorer needs clip_model, an open_clip architecture"),
                (
                    self.clip_checkpoint is not None and location(self.clip_checkpoint).is_file(),
                    f"the clip scorer needs clip_checkpoint, a weights file; {self.clip_checkpoint} is not one",
                ),
            ]
        check_config(
            name,
            [
                *model,
                SCORERS[self.scorer].check_threshold(self.threshold),
                (
                    isinstance(self.best_per_image, int) and self.best_per_image >= 0,
                    f"best_per_image must be an integer ≥ 0 (0 keeps every caption), got {self.best_per_image!r}",
                ),
                (self.max_caption_chars >= 1, f"max_caption_chars must be >= 1, got {self.max_caption_chars}"),
            ],
        )
        # a bad or wrong model stops here, before any work
        if self.scorer == "itm":
            check_checkpoint(self.checkpoint, FILTER_NEEDS, "the filter stage")
        else:
            require_finite_file(self.clip_checkpoint)

    def model_ref(self) -> str:
        """The digest of the scorer's model, as its actors record it."""
        return checkpoint_digest(self.checkpoint) if self.scorer == "itm" else file_digest(self.clip_checkpoint)


def scorer_actor(config: FilterConfig) -> type[ImageModelActor]:
    """The actor that scores captions for `config.scorer`."""
    return FilterActor if config.scorer == "itm" else ClipActor


class FilterActor(ImageModelActor):
    """Holds one filter model; scores each image's candidates (ITM probability, ITC similarity)."""

    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("itm", pa.list_(pa.float32())),
        pa.field("itc", pa.list_(pa.float32())),
    ]

    def __init__(self, config: FilterConfig) -> None:
        model, self.tokenizer, self.model_ref = load_checkpoint(config.checkpoint, config.device)
        self.model = for_inference(model)

    @classmethod
    def image_transform(cls, config: FilterConfig) -> ImageTransform:
        return image_transform(checkpoint_config(config.checkpoint), train=False)

    def infer(self, pixels: torch.Tensor, requests: list[Row]) -> list[Row]:
        scores = score_captions(self.model, self.tokenizer, pixels, [request["texts"] for request in requests])
        return [{"itm": image_scores.itm, "itc": image_scores.itc} for image_scores in scores]


def decide(row: Row, threshold: float, scorer: Scorer) -> Row:
    """The verdict on a row that `scorer` scored: kept when its score reaches the threshold."""
    if row[scorer.column] >= threshold:
        return {**row, "kept": True, "reject_stage": None, "reject_reason": None, "reject_detail": None}
    return rejected(row, STAGE, scorer.reject_reason)


def keep_best(rows: list[Row], scorer: Scorer, best_per_image: int) -> list[Row]:
    """The rows with every image's kept, scored captions beyond its `best_per_image` best rejected as
    outranked (ties go to the smaller sample_id); 0 changes nothing."""
    if best_per_image == 0:
        return rows
    scores = {row["sample_id"]: row[scorer.column] for row in rows if row["kept"] and row[scorer.column] is not None}
    rank_of = ranks_by_image(rows, scores)
    return [
        rejected(row, STAGE, scorer.outranked_reason) if rank_of.get(row["sample_id"], 0) >= best_per_image else row
        for row in rows
    ]


def _stats(
    rows: list[Row], scorer: str, threshold: float, best_per_image: int, model_ref: str | None
) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "scored": sum(row[SCORERS[scorer].column] is not None for row in rows),
        "kept": sum(row["kept"] for row in rows),
        "rejected": dict(Counter(row["reject_reason"] for row in rows if row["reject_stage"] == STAGE)),
        "scorer": scorer,
        "threshold": threshold,
        "best_per_image": best_per_image,
        "model_ref": model_ref,
    }


@dataclass(frozen=True)
class _Filtering(CaptionScoringStage):
    config: FilterConfig
    name: ClassVar[str] = STAGE

    def actor(self) -> type[ImageModelActor]:
        return scorer_actor(self.config)

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        scorer = SCORERS[self.config.scorer]
        scores = scorer.scores(results)
        failed = {result["image_id"]: result for result in results if result["error_reason"]}
        rows = []
        for row in self.rows(shard):
            if not row["kept"]:
                rows.append(row)
            elif row["sample_id"] in scores[scorer.column]:
                scored = {**row, **{column: values[row["sample_id"]] for column, values in scores.items()}}
                rows.append(decide(scored, self.config.threshold, scorer))
            elif row["image_id"] in failed:
                failure = failed[row["image_id"]]
                rows.append(rejected(row, STAGE, failure["error_reason"], failure["error_detail"]))
            elif model_text(row["caption"], self.config.max_caption_chars) is None:
                rows.append(rejected(row, STAGE, "empty_caption"))
            else:  # no image to score it against
                rows.append(row)
        model_ref = results[0]["model_ref"] if results else None
        config = self.config
        rows = keep_best(rows, scorer, config.best_per_image)
        return rows_table(rows), _stats(rows, scorer.name, config.threshold, config.best_per_image, model_ref)


def scored_by(target: Generation, shard: str) -> tuple[str, dict[str, Any]]:
    """The scorer that scored a filtered shard (markers before the scorers were named: itm), and its marker."""
    marker = json.loads(target.marker_path(STAGE, shard).read_text())
    return marker.get("scorer", "itm"), marker


def _redecide_shard(
    target: Generation,
    shard: str,
    threshold: float,
    best_per_image: int | None = None,
    expected: tuple[str, str] | None = None,
) -> None:
    """Re-decide a scored shard from its stored scores; rewrites it only when the threshold or `best_per_image`
    (None: the shard's) changed. With `expected` (scorer, model_ref), refuses scores that another scorer or
    model produced."""
    name, marker = scored_by(target, shard)
    scorer = SCORERS[name]
    if expected is not None and (name != expected[0] or marker["model_ref"] not in (None, expected[1])):
        raise ManifestError(
            f"{target.path}: shard {shard} was scored by the {name} scorer with model {marker['model_ref']}, not "
            f"by the given {expected[0]} scorer and model ({expected[1]}); filter into a new generation, "
            f"or delete {target.marker_path(STAGE, '*')} to re-score"
        )
    shard_best = marker.get("best_per_image", 0)
    best_per_image = shard_best if best_per_image is None else best_per_image
    if (marker["threshold"], shard_best) == (threshold, best_per_image):
        return
    rows = undo_from(read_part(target.part_path(shard)).to_pylist(), "rank")  # rank's view will be stale
    rows = [decide(row, threshold, scorer) if row[scorer.column] is not None else row for row in rows]
    rows = keep_best(rows, scorer, best_per_image)
    stats = _stats(rows, name, threshold, best_per_image, marker["model_ref"])
    commit_shard(target, STAGE, shard, rows_table(rows), stats)


def rethreshold(target: Generation, threshold: float, best_per_image: int | None = None) -> dict[str, Any]:
    """Re-decide every shard of a filtered generation at `threshold` (a threshold of the scorer that scored
    it) and `best_per_image` (None: each shard's) from the stored scores, without loading a model; returns
    the target's `generation_counts`. Shards whose decision changed must be ranked again."""
    with target.writer(STAGE):
        shards = shards_finished_by(target, STAGE)
        for scorer in sorted({scored_by(target, shard)[0] for shard in shards}):
            ok, message = SCORERS[scorer].check_threshold(threshold)
            if not ok:
                raise ValueError(message)
        _check_parts(target, shards)
        for shard in shards:
            _redecide_shard(target, shard, threshold, best_per_image)
        return target.counts()


def _check_parts(target: Generation, shards: list[str]) -> None:
    """Read every part that a re-decision may rewrite, so that a bad one stops it before any write."""
    for shard in shards:
        read_part(target.part_path(shard))


def run_filter(config: FilterConfig, target: Generation) -> dict[str, Any]:
    """Score and decide every captioned shard of `target`; already scored shards are only re-decided
    (at `config.threshold` and `config.best_per_image`). Returns the target's `generation_counts`."""
    with target.writer(STAGE):
        shards = captioned_shards(target)
        scored = [shard for shard in shards if target.is_done(STAGE, shard)]
        if scored:
            expected = (config.scorer, config.model_ref())
            _check_parts(target, scored)
            for shard in scored:
                _redecide_shard(target, shard, config.threshold, config.best_per_image, expected)
        return run_sharded_inference(_Filtering(config, target), target, shards, config)
