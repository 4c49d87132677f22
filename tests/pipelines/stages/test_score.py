"""The score stage: a second filter scorer's scores on a filtered and ranked generation, deciding nothing."""

import json
import statistics

import pytest

from pipelines.manifests.manifest import Generation, ManifestError
from pipelines.stages.caption import CaptionConfig, run_caption
from pipelines.stages.filter import FilterConfig, rethreshold, run_filter
from pipelines.stages.rank import RankConfig, run_rank
from pipelines.stages.score import run_score

DECISION = ("kept", "reject_stage", "reject_reason", "itm_score", "itc_score", "clip_score", "clip_rank", "caption")


def test_clip_scores_are_added_to_every_filtered_row_and_no_decision_changes(
    web_gen0, tiny_blip_checkpoint, tiny_clip_checkpoint
):
    target = Generation(web_gen0.root, web_gen0.dataset, 1)
    run_caption(CaptionConfig(tiny_blip_checkpoint, num_captions=2, min_length=2, max_length=6), web_gen0, target)
    run_filter(FilterConfig(tiny_blip_checkpoint, threshold=0.5), target)
    rethreshold(target, statistics.median(row["itm_score"] for row in target.read_samples().to_pylist()
                                          if row["itm_score"] is not None))  # fmt: skip
    run_rank(RankConfig(clip_model="clip_tiny", clip_checkpoint=tiny_clip_checkpoint), target)
    before = {row["sample_id"]: row for row in target.read_samples().to_pylist()}
    assert 0 < sum(not row["kept"] and row["reject_stage"] == "filter" for row in before.values())

    clip = FilterConfig(scorer="clip", clip_model="clip_tiny", clip_checkpoint=tiny_clip_checkpoint, batch_size=5)
    run_score(clip, target)
    after = target.read_samples().to_pylist()
    assert {row["sample_id"] for row in after} == set(before)
    for row in after:
        assert [row[column] for column in DECISION] == [before[row["sample_id"]][column] for column in DECISION]
        assert (row["filter_clip_score"] is not None) == (row["itm_score"] is not None), "every ITM-scored row"
    ranked = [row for row in after if row["clip_score"] is not None]
    assert ranked and all(row["filter_clip_score"] == pytest.approx(row["clip_score"], abs=1e-5) for row in ranked)
    marker = json.loads(target.marker_path("score", "00000").read_text())
    assert marker["scorer"] == "clip" and marker["scored"] > 0
    assert target.is_done("rank", "00000"), "the ranker's results stand"

    with pytest.raises(ManifestError, match="the filter decided with the itm scorer"):
        run_score(FilterConfig(tiny_blip_checkpoint), target)
    run_filter(FilterConfig(tiny_blip_checkpoint, threshold=0.4), target)  # a new decision: the scores go stale
    assert not target.is_done("score", "00000")
