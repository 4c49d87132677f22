"""The CLIP rank stage on the captioned and filtered stage world, with real Ray, a randomly initialised
tiny BLIP (captioner and filter) and a randomly initialised clip_tiny saved as safetensors."""

import statistics
from collections import defaultdict

import pytest

from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation, ManifestError
from pipelines.stages.caption import CaptionConfig, run_caption
from pipelines.stages.filter import FilterConfig, rethreshold, run_filter
from pipelines.stages.rank import RankConfig, ranks_by_image, run_rank
from vlp_core.checkpoint import file_digest
from vlp_core.clip import load_clip
from vlp_core.data import load_image, normalize_caption

WEB_SHARDS = ["00000", "00001", "00002", "00003"]
TOP_K = 2


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, downloaded_gen0, tiny_blip_checkpoint, dataset_copier) -> Generation:
    """Generation 1 after caption (4 captions per image) and filter at the median ITM score."""
    web = dataset_copier(downloaded_gen0, tmp_path_factory.mktemp("ranked"))
    target = Generation(web.root, web.dataset, 1)
    run_caption(CaptionConfig(tiny_blip_checkpoint, num_captions=4, min_length=2, max_length=8), web, target)
    run_filter(FilterConfig(tiny_blip_checkpoint, threshold=0.0, batch_size=8), target)
    scores = target.read_samples()["itm_score"]
    rethreshold(target, statistics.median(s for s in scores.to_pylist() if s is not None))
    return target


@pytest.fixture(scope="module")
def ranked(filtered, tiny_clip_checkpoint, tmp_path_factory, dataset_copier) -> tuple[Generation, Generation]:
    """(the filtered generation, a copy of it after ranking)."""
    target = dataset_copier(filtered, tmp_path_factory.mktemp("ranked_copy"))
    run_rank(RankConfig("clip_tiny", tiny_clip_checkpoint, top_k=TOP_K, batch_size=4, concurrency=2), target)
    return filtered, target


def test_survivors_of_the_filter_are_ranked_per_image_and_the_top_k_kept(ranked, tiny_clip_checkpoint):
    filtered, target = ranked
    before = {row["sample_id"]: row for row in filtered.read_samples().to_pylist()}
    rows = target.read_samples().to_pylist()
    assert sorted(row["sample_id"] for row in rows) == sorted(before), "same samples, each exactly once"

    by_image = defaultdict(list)
    for row in rows:
        if before[row["sample_id"]]["kept"]:
            by_image[row["image_id"]].append(row)
        else:
            assert row == before[row["sample_id"]], "rows rejected before rank are left alone"
    assert len(by_image) > 20
    assert {"web", "synthetic"} <= {row["caption_source"] for row in sum(by_image.values(), [])}
    for candidates in by_image.values():
        best_first = sorted(candidates, key=lambda row: (-row["clip_score"], row["sample_id"]))
        assert [row["clip_rank"] for row in best_first] == list(range(len(candidates)))
        for row in candidates:
            if row["clip_rank"] < TOP_K:
                assert row["kept"] and row["reject_stage"] is None
            else:
                assert (row["kept"], row["reject_stage"], row["reject_reason"]) == (False, "rank", "clip_rank")
        assert sum(row["kept"] for row in candidates) == min(TOP_K, len(candidates))

    ranker, store = load_clip("clip_tiny", tiny_clip_checkpoint), ImageStore(target.path.parent)
    for candidates in list(by_image.values())[::7]:  # the stored scores are those of the very pairs
        features = ranker.image_features(ranker.preprocess(load_image(store.read(candidates[0]["image_ref"])))[None])
        texts = [normalize_caption(row["caption"], 300)[0] for row in candidates]
        expected = ranker.scores(features, [texts])[0].tolist()
        assert [row["clip_score"] for row in candidates] == pytest.approx(expected, abs=1e-4)
    marker = target.marker_path("rank", "00000").read_text()
    assert file_digest(tiny_clip_checkpoint) in marker


def test_ties_go_to_the_smaller_sample_id():
    rows = [{"sample_id": s, "image_id": i} for s, i in [("b", "x"), ("a", "x"), ("c", "x"), ("d", "y")]]
    assert ranks_by_image(rows, {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.1}) == {"c": 0, "a": 1, "b": 2, "d": 0}
    assert ranks_by_image(rows, {"a": 0.5}) == {"a": 0}, "unscored rows have no rank"


def test_rerun_skips_ranked_shards_and_a_new_threshold_reopens_them(
    ranked, tmp_path, dataset_copier, tiny_clip_checkpoint, no_inference
):
    _, ranked_target = ranked
    target = dataset_copier(ranked_target, tmp_path)
    table = target.read_samples()
    run_rank(RankConfig("clip_tiny", tiny_clip_checkpoint, top_k=5), target)
    assert target.read_samples().equals(table)

    rethreshold(target, 0.0)  # the filter keeps every scored row again: rank's view is stale
    assert not any(target.is_done("rank", shard) for shard in WEB_SHARDS)
    reopened = target.read_samples().to_pylist()
    assert all(row["clip_score"] is None and row["clip_rank"] is None for row in reopened)
    assert "rank" not in {row["reject_stage"] for row in reopened}


def test_bad_inputs_fail_before_any_work(tiny_clip_checkpoint, downloaded_gen0, tmp_path, no_inference):
    with pytest.raises(ValueError, match="RankConfig: top_k must be >= 1"):
        RankConfig("clip_tiny", tiny_clip_checkpoint, top_k=0)
    with pytest.raises(ValueError, match="is not a file"):
        RankConfig("clip_tiny", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RankConfig("clip_tiny", None, batch_size=0)
    with pytest.raises(ManifestError, match="no captioned shards"):
        run_rank(RankConfig("clip_tiny", None), Generation(downloaded_gen0.root, "world", 0))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_manifest(
    filtered, tiny_clip_checkpoint, resumes_like_uninterrupted
):
    resumes_like_uninterrupted(
        run_rank, RankConfig("clip_tiny", tiny_clip_checkpoint, top_k=TOP_K, batch_size=1), filtered
    )
