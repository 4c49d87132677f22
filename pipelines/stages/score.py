"""Score stage: a second filter scorer scores a filtered generation's candidates, deciding nothing.

The filter decides with one scorer (`filter.SCORERS`); the ablation compares scorers on the same
candidates (e.g. BLIP's ITM against a CLIP-score cut), so it needs the other scorer's scores for every
row the filter scored, kept or not. This stage fills that scorer's columns (`itm_score` and `itc_score`,
or `filter_clip_score`) and leaves `kept` and the reasons as they are. It runs after the ranker; a new
filter or rank pass over a shard deletes its marker, and its scores are cleared with the filter's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, read_part
from pipelines.stages.actors import ImageModelActor
from pipelines.stages.filter import SCORERS, FilterConfig, is_scored, scored_by, scorer_actor
from pipelines.stages.shards import (
    Row,
    image_requests,
    model_text,
    rows_table,
    run_sharded_inference,
    shards_finished_by,
)

STAGE = registry.SCORE.name


@dataclass(frozen=True)
class _Scoring:
    config: FilterConfig  # the scorer and its model; its threshold is not used
    target: Generation
    name: ClassVar[str] = STAGE

    def rows(self, shard: str) -> list[Row]:
        return read_part(self.target.part_path(shard)).to_pylist()

    def requests(self, shard: str) -> pa.Table:
        """Every row the filter scored, kept or rejected, with its caption as the scorers read it."""
        scored = [row for row in self.rows(shard) if is_scored(row)]
        texts = [model_text(row["caption"], self.config.max_caption_chars) for row in scored]
        return image_requests(shard, scored, texts)

    def actor(self) -> type[ImageModelActor]:
        return scorer_actor(self.config)

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        scorer = SCORERS[self.config.scorer]
        scores = scorer.scores(results)
        rows = [
            {**row, **{column: values[row["sample_id"]] for column, values in scores.items()}}
            if row["sample_id"] in scores[scorer.column]
            else row
            for row in self.rows(shard)
        ]
        model_ref = results[0]["model_ref"] if results else None
        return rows_table(rows), {"rows": len(rows), "scored": len(scores[scorer.column]), "scorer": scorer.name,
                                  "model_ref": model_ref}  # fmt: skip


def run_score(config: FilterConfig, target: Generation) -> dict[str, Any]:
    """Add `config.scorer`'s scores to every ranked shard of `target` (a scorer other than the one its filter
    decided with); returns the target's `generation_counts`."""
    shards = shards_finished_by(target, registry.RANK.name)
    if config.scorer in {scored_by(target, shard)[0] for shard in shards}:
        raise ManifestError(
            f"{target.path}: the filter decided with the {config.scorer} scorer, so its {config.scorer} scores are "
            "there already; the score stage adds another scorer's"
        )
    return run_sharded_inference(_Scoring(config, target), target, shards, config)
