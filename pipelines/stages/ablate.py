"""Ablation arms (BLIP Table 1): one fully scored candidate generation, re-decided by each arm's rules.

The candidate generation is the output of one CapFilt round: every web caption and every synthetic
caption of the web images, each with its stored ITM score, and the filter survivors with their CLIP
score. An arm is a set of rules over those rows, so every arm sees the same captions and the same
scores, and differs only in what it keeps:

    arm             captioner  filter  CLIP rank   keeps (plus the human pairs)
    no_capfilt          -         -        -       every web caption
    filter_only         -         ✓        -       web captions whose filter score ≥ threshold
    captioner_only      ✓         -        -       every web and synthetic caption
    capfilt             ✓         ✓        -       web and synthetic captions whose score ≥ threshold
                                                   (with the filter's best_per_image: each image's best)
    capfilt_rank        ✓         ✓        ✓       those, then the CLIP top-k per image
    filter_only_clip    -       CLIP       -       filter_only, decided by the clip scorer
    capfilt_clip        ✓       CLIP       -       capfilt, decided by the clip scorer

The filter arms decide by the scorer the candidates were filtered with, unless they name one: the `_clip`
arms compare a CLIP-score cut with the candidates' ITM filter on the same captions (the `score` stage
adds the CLIP scores to the candidates first). The first five are BLIP's Table 1 (`TABLE_1`).

`arm_rows` lifts the decisions the filter and the ranker took from a stored score, then decides again by
the arm's rules; synthetic rows of an arm without the captioner are rejected as
`ablate/synthetic_not_in_arm`. Rows rejected for other reasons (download errors, empty captions,
undecodable images) stay rejected: no arm could train on them.

`derive_arm` writes an arm's rows as generation `candidates.number` of dataset `ablate-<arm>` (same
manifest root), one part per candidate shard with an `ablate` marker, then `run_assemble` adds the human
pairs. Relative image_refs are re-based onto the arm's dataset folder (`../web/gen-0000/shards/…`), so
the images are not copied and the manifest root still moves as a whole. A re-run skips shards whose
marker records the same rules and the same candidate part.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from pipelines import registry
from pipelines.manifests.images import rebased
from pipelines.manifests.manifest import Generation, config_digest, manifest_digest, read_part
from pipelines.stages.assemble import AssembleConfig, run_assemble
from pipelines.stages.evaluate import EvaluateConfig, run_evaluate
from pipelines.stages.filter import SCORERS, decide, is_scored, keep_best, scored_by
from pipelines.stages.filter import STAGE as FILTER_STAGE
from pipelines.stages.rank import STAGE as RANK_STAGE
from pipelines.stages.rank import keep_top_k
from pipelines.stages.shards import Row, rejected, rows_table, shards_finished_by
from vlp_core.atomic import atomic_write_json
from vlp_core.storage import Location

STAGE = registry.ABLATE.name
DATASET_PREFIX = "ablate-"


@dataclass(frozen=True)
class Arm:
    """One row of the ablation table: which CapFilt components build its training data."""

    name: str
    captioner: bool  # the synthetic captions are candidates
    filter: bool  # candidates need a filter score ≥ threshold
    rank: bool  # then only the CLIP top-k per image stay
    scorer: str | None = None  # the filter's scorer; None: the one the candidates were filtered with

    def __post_init__(self) -> None:
        if self.rank and not self.filter:
            raise ValueError(f"arm {self.name}: CLIP ranks the filter's survivors, so rank needs the filter")
        if self.rank and self.scorer is not None:
            raise ValueError(f"arm {self.name}: the ranker ranked the candidates' filter survivors; name no scorer")


ARMS = {
    arm.name: arm
    for arm in (
        Arm("no_capfilt", captioner=False, filter=False, rank=False),
        Arm("filter_only", captioner=False, filter=True, rank=False),
        Arm("captioner_only", captioner=True, filter=False, rank=False),
        Arm("capfilt", captioner=True, filter=True, rank=False),
        Arm("capfilt_rank", captioner=True, filter=True, rank=True),
        Arm("filter_only_clip", captioner=False, filter=True, rank=False, scorer="clip"),
        Arm("capfilt_clip", captioner=True, filter=True, rank=False, scorer="clip"),
    )
}
TABLE_1 = ("no_capfilt", "filter_only", "captioner_only", "capfilt", "capfilt_rank")  # the default arms


def arms_named(names: list[str]) -> list[Arm]:
    """The arms of `names`, in that order; an unknown or repeated name is a ValueError."""
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"arms: need distinct names from {list(ARMS)}, got {names}")
    return [ARMS[name] for name in names]


def lift_score_decisions(rows: list[Row]) -> list[Row]:
    """The rows with the filter's and the ranker's score-based rejections lifted, scores kept. A row they
    rejected without a score (its image failed to decode, its caption was empty) stays rejected."""
    lifted = {"kept": True, "reject_stage": None, "reject_reason": None, "reject_detail": None}
    scored = {FILTER_STAGE: is_scored, RANK_STAGE: lambda row: row["clip_score"] is not None}
    return [
        {**row, **lifted} if row["reject_stage"] in scored and scored[row["reject_stage"]](row) else row for row in rows
    ]


def arm_rows(
    rows: list[Row], arm: Arm, scorer: str, threshold: float, top_k: int, best_per_image: int = 0
) -> list[Row]:
    """The candidate rows (web and synthetic, fully scored) as `arm` decides them with `scorer` at
    `threshold` and `best_per_image` (see `FilterConfig`), in the same order."""
    decided = []
    for row in lift_score_decisions(rows):
        if row["kept"] and row["caption_source"] == "synthetic" and not arm.captioner:
            row = rejected(row, STAGE, "synthetic_not_in_arm")
        elif row["kept"] and arm.filter and is_scored(row):
            if row[SCORERS[scorer].column] is None:
                raise ValueError(
                    f"arm {arm.name}: sample {row['sample_id']} has no {scorer} score; add the {scorer} scorer's "
                    "scores to the candidates first (the score stage)"
                )
            row = decide(row, threshold, SCORERS[scorer])
        decided.append(row)
    if arm.filter:
        decided = keep_best(decided, SCORERS[scorer], best_per_image)
    if not arm.rank:
        return decided
    survivors = [row for row in decided if row["kept"] and is_scored(row)]
    unranked = [row["sample_id"] for row in survivors if row["clip_score"] is None]
    if unranked:
        raise ValueError(
            f"arm {arm.name}: {len(unranked)} row(s) kept at filter threshold {threshold} have no "
            f"clip_score (e.g. sample {unranked[0]}); the candidates were ranked after a stricter "
            "filter: rank them again at this threshold, or use the candidates' threshold"
        )
    return keep_top_k(decided, {row["sample_id"]: row["clip_score"] for row in survivors}, top_k)


def arm_generation(candidates: Generation, arm: Arm) -> Generation:
    """Where `arm`'s rows of `candidates` live: dataset `ablate-<arm>`, the candidates' number and root."""
    return Generation(candidates.root, DATASET_PREFIX + arm.name, candidates.number)


def derive_arm(
    candidates: Generation,
    arm: Arm,
    human: AssembleConfig,
    thresholds: dict[str, float],
    top_k: int,
    best_per_image: int = 0,
) -> Generation:
    """Write `arm`'s generation from the ranked `candidates` (see the module docstring), each filter arm
    deciding at its scorer's threshold (`thresholds`: scorer name -> threshold) and `best_per_image`;
    returns it."""
    target = arm_generation(candidates, arm)
    with target.writer(STAGE):
        shards = shards_finished_by(candidates, RANK_STAGE)
        scorers = {arm.scorer or scored_by(candidates, shard)[0] for shard in shards}
        if len(scorers) > 1:
            raise ValueError(f"{candidates.path}: its shards were filtered by different scorers {sorted(scorers)}")
        scorer = scorers.pop() if scorers else "itm"
        rules = {"arm": asdict(arm), "scorer": scorer, "threshold": thresholds[scorer], "top_k": top_k}
        if best_per_image:  # absent when 0, so that arms derived before the setting existed stay valid
            rules["best_per_image"] = best_per_image
        for shard in shards:
            source = candidates.part_path(shard)
            key = config_digest({**rules, "candidates": "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()})
            if target.is_done(STAGE, shard) and json.loads(target.marker_path(STAGE, shard).read_text())["key"] == key:
                continue
            rows = rebased(
                arm_rows(read_part(source).to_pylist(), arm, scorer, thresholds[scorer], top_k, best_per_image),
                candidates.path.parent,
                target.path.parent,
            )
            target.marker_path(STAGE, shard).unlink(missing_ok=True)
            target.write_part(
                STAGE,
                shard,
                rows_table(rows),
                {
                    "key": key,
                    **rules,
                    "rows": len(rows),
                    "kept": sum(row["kept"] for row in rows),
                    "rejected": dict(
                        Counter(f"{row['reject_stage']}/{row['reject_reason']}" for row in rows if not row["kept"])
                    ),
                },
            )
        info = candidates.read_info()
        run_assemble(
            human,
            target,
            info["parent_generation"],
            checkpoints=info["checkpoints"],
            stages=[STAGE],
            config_digest=config_digest({**rules, "candidates": manifest_digest(candidates)}),
        )
    return target


def evaluate_once(
    config: EvaluateConfig, generation: Generation, output: Location, same_pairs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`run_evaluate` into `output`, unless `output` already holds an evaluation with this very config
    (the checkpoint folder is named by its training's settings and data, so the same path is the same model).

    `same_pairs`: this model's evaluation on another arm's generation that keeps the very same pairs (such
    arms share their trainings); written as `generation`'s without evaluating again, as the model, the
    held-out set and the pairs the data figures count are the same."""
    if output.is_file():
        previous = json.loads(output.read_text())
        if previous.get("config") == json.loads(json.dumps(asdict(config), default=str)):
            return previous
    if same_pairs is not None:
        evaluation = {**same_pairs, "dataset": generation.dataset, "generation": generation.number}
        atomic_write_json(output, evaluation)
        return evaluation
    return run_evaluate(config, generation, output)
