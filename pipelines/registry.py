"""The one place that knows the stages: their names, their order, the score columns they write, and
whether the rows they reject were judged on their caption.

The shard loop (which later stages a commit invalidates), the report (the order of its tables), the
evaluation and the ablation (which rejections count as the filter's) read it; so do the command line and
the flows, through the stage modules' `STAGE` names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A stage that writes manifest rows.

    config: its config dataclass, as "module:Class" (read lazily: the stage modules import torch).
    scores: the nullable score columns it fills (cleared when it is undone).
    model_stage: it runs a model over the shards (`stages.shards.run_sharded_inference`), in STAGES order.
    screens_captions: a row it rejects was judged on its caption; rows rejected by the other stages (a dead
        URL, an undecodable image) never reached a caption screen.
    outranked_reasons: the reasons it gives a row that passed its screen but ranked below others of its
        image (the report counts them apart from the rows it judged noisy).
    """

    name: str
    config: str | None = None
    scores: tuple[str, ...] = ()
    model_stage: bool = False
    screens_captions: bool = False
    outranked_reasons: tuple[str, ...] = ()


DOWNLOAD = Stage("download", "pipelines.stages.download:DownloadConfig")
CAPTION = Stage("caption", "pipelines.stages.caption:CaptionConfig", model_stage=True)
FILTER = Stage(
    "filter",
    "pipelines.stages.filter:FilterConfig",
    scores=("itm_score", "itc_score", "filter_clip_score"),
    model_stage=True,
    screens_captions=True,
    outranked_reasons=("itm_outranked", "clip_outranked"),  # best_per_image
)
RANK = Stage(
    "rank",
    "pipelines.stages.rank:RankConfig",
    scores=("clip_score", "clip_rank"),
    model_stage=True,
    screens_captions=True,
)
# a second filter scorer's scores for the ablation, deciding nothing (its config and columns are the filter's)
SCORE = Stage("score", model_stage=True)
ABLATE = Stage("ablate", screens_captions=True)  # re-decides a candidate generation's rows by an arm's rules
ASSEMBLE = Stage("assemble", "pipelines.stages.assemble:AssembleConfig")

STAGES = (DOWNLOAD, CAPTION, FILTER, RANK, SCORE, ABLATE, ASSEMBLE)  # the order in which they touch a generation
STAGE_NAMES = tuple(stage.name for stage in STAGES)
MODEL_STAGES = tuple(stage.name for stage in STAGES if stage.model_stage)  # the shard loop's stages, in order
UNSCREENED_STAGES = tuple(stage.name for stage in STAGES if not stage.screens_captions)
OUTRANKED = "outranked"  # the decision of a row rejected for one of its stage's outranked_reasons
OUTRANKED_REASONS = frozenset(reason for stage in STAGES for reason in stage.outranked_reasons)


def stage_named(name: str) -> Stage:
    """The registered stage called `name`; ValueError naming the known ones otherwise."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; known: {STAGE_NAMES}")


def in_stage_order(names: set[str] | list[str]) -> list[str]:
    """`names` with the registered stages first, in their order, then any others sorted."""
    known = [name for name in STAGE_NAMES if name in names]
    return known + sorted(set(names) - set(STAGE_NAMES))
