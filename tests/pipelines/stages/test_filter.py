"""The filter stage and re-thresholding on the captioned stage world, with real Ray and a randomly
initialised tiny BLIP (as captioner and as filter; random weights are enough for the mechanics)."""

import dataclasses
import json
import statistics
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipelines.cli.main import main as cli_main
from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation, ManifestError, generation_counts, read_part, sample_id
from pipelines.stages.caption import CaptionConfig, run_caption
from pipelines.stages.filter import FilterConfig, rethreshold, run_filter
from vlp_core.checkpoint import load_checkpoint, save_checkpoint
from vlp_core.clip import load_clip
from vlp_core.data import image_transform, load_image, normalize_caption
from vlp_core.scoring import score_captions

WEB_SHARDS = ["00000", "00001", "00002", "00003"]
EMPTY_CAPTION = "<p> &nbsp; </p>"


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, downloaded_gen0, tiny_blip_checkpoint, dataset_copier) -> Generation:
    """Generation 1 after the caption stage (3 captions per image), one web caption made empty."""
    web = dataset_copier(downloaded_gen0, tmp_path_factory.mktemp("captioned"))
    target = Generation(web.root, web.dataset, 1)
    run_caption(CaptionConfig(tiny_blip_checkpoint, num_captions=3, min_length=2, max_length=8), web, target)
    part = read_part(target.part_path("00000"))
    rows = part.to_pylist()
    victim = next(row for row in rows if row["kept"] and row["caption_source"] == "web")
    victim.update(caption=EMPTY_CAPTION, sample_id=sample_id(victim["image_id"], "web", EMPTY_CAPTION))
    target.write_part("caption", "00000", pa.Table.from_pylist(rows, schema=part.schema), {})
    return target


@pytest.fixture(scope="module")
def config(tiny_blip_checkpoint: Path) -> FilterConfig:
    return FilterConfig(tiny_blip_checkpoint, threshold=0.5, batch_size=3)


@pytest.fixture(scope="module")
def filtered(captioned: Generation, config: FilterConfig, tmp_path_factory, dataset_copier) -> Generation:
    target = dataset_copier(captioned, tmp_path_factory.mktemp("filtered"))
    run_filter(config, target)
    return target


def _is_empty(caption: str | None) -> bool:
    return normalize_caption(caption or "", max_chars=300)[0] is None


def _assert_decided_at(table: pa.Table, threshold: float) -> None:
    for row in table.to_pylist():
        if row["itm_score"] is not None:
            assert row["kept"] == (row["itm_score"] >= threshold), row
            if not row["kept"]:
                assert (row["reject_stage"], row["reject_reason"]) == ("filter", "itm_below_threshold")


def test_candidates_are_scored_and_decided(captioned, filtered, config, tiny_blip_checkpoint):
    before = {row["sample_id"]: row for row in captioned.read_samples().to_pylist()}
    rows = filtered.read_samples().to_pylist()
    assert sorted(row["sample_id"] for row in rows) == sorted(before), "same samples, each exactly once"
    for row in rows:
        was = before[row["sample_id"]]
        if not was["kept"]:
            assert row == was, "rows rejected earlier are left alone"
        elif _is_empty(row["caption"]):
            assert (row["kept"], row["reject_reason"], row["itm_score"]) == (False, "empty_caption", None)
        else:
            assert 0.0 <= row["itm_score"] <= 1.0 and -1.0 <= row["itc_score"] <= 1.0
    _assert_decided_at(filtered.read_samples(), config.threshold)
    scored = [row for row in rows if row["itm_score"] is not None]
    empty = [row for row in rows if row["reject_reason"] == "empty_caption"]
    assert EMPTY_CAPTION in [row["caption"] for row in empty]
    assert len(scored) == sum(was["kept"] for was in before.values()) - len(empty)
    assert len({round(row["itm_score"], 6) for row in scored}) > len(scored) // 2, "scores depend on the pair"

    model, tokenizer, digest = load_checkpoint(tiny_blip_checkpoint)
    transform, store = image_transform(model.config, train=False), ImageStore(filtered.path.parent)
    for row in scored[::17]:  # the stored scores are those of the very pair
        pixels = transform(load_image(store.read(row["image_ref"])))[None]
        text, _ = normalize_caption(row["caption"], config.max_caption_chars)
        expected = score_captions(model, tokenizer, pixels, [[text]])[0]
        assert row["itm_score"] == pytest.approx(expected.itm[0], abs=1e-4)
        assert row["itc_score"] == pytest.approx(expected.itc[0], abs=1e-4)
    marker = json.loads(filtered.marker_path("filter", "00000").read_text())
    assert marker["model_ref"] == digest and marker["threshold"] == 0.5 and marker["rejected"]["empty_caption"] >= 1


def test_rethreshold_redecides_from_stored_scores_without_a_model(
    filtered, config, tmp_path, dataset_copier, no_inference
):
    target = dataset_copier(filtered, tmp_path)
    scores = {row["sample_id"]: row["itm_score"] for row in target.read_samples().to_pylist()}
    median = statistics.median(s for s in scores.values() if s is not None)
    target.mark_done("rank", "00001", {})  # pretend rank ran: its view goes stale with a new threshold

    rethreshold(target, median)
    table = target.read_samples()
    _assert_decided_at(table, median)
    assert 0 < sum(table["kept"].to_pylist()) < table.num_rows
    assert {row["sample_id"]: row["itm_score"] for row in table.to_pylist()} == scores
    assert not target.is_done("rank", "00001")
    assert "empty_caption" in table["reject_reason"].to_pylist()

    target.mark_done("rank", "00001", {})
    parts = {shard: target.part_path(shard).stat().st_mtime_ns for shard in WEB_SHARDS}
    assert rethreshold(target, median) == generation_counts([table])
    assert target.read_samples().equals(table)
    assert {shard: target.part_path(shard).stat().st_mtime_ns for shard in parts} == parts, "same threshold: untouched"
    assert target.is_done("rank", "00001")

    top = max(score for score in scores.values() if score is not None)
    run_filter(dataclasses.replace(config, threshold=top), target)
    strict = target.read_samples()
    _assert_decided_at(strict, top)
    assert sum(row["kept"] and row["itm_score"] is not None for row in strict.to_pylist()) == 1


def _kept_per_image(table: pa.Table) -> dict[str, list[float]]:
    """Each image's kept, scored captions' ITM scores, best first."""
    kept: dict[str, list[float]] = {}
    for row in table.to_pylist():
        if row["kept"] and row["itm_score"] is not None:
            kept.setdefault(row["image_id"], []).append(row["itm_score"])
    return {image: sorted(scores, reverse=True) for image, scores in kept.items()}


def test_a_first_filtering_with_best_per_image_decides_as_a_rethreshold_of_its_scores(
    captioned, filtered, config, tmp_path, dataset_copier
):
    scored_now = dataset_copier(captioned, tmp_path / "now")
    run_filter(dataclasses.replace(config, best_per_image=1), scored_now)
    redecided = dataset_copier(filtered, tmp_path / "redecided")
    rethreshold(redecided, config.threshold, best_per_image=1)
    assert scored_now.read_samples().equals(redecided.read_samples())
    assert "itm_outranked" in scored_now.read_samples()["reject_reason"].to_pylist()


def test_best_per_image_keeps_each_images_best_scored_captions_that_pass(
    filtered, config, tmp_path, dataset_copier, no_inference
):
    target = dataset_copier(filtered, tmp_path)
    rows = target.read_samples().to_pylist()
    scores = [row["itm_score"] for row in rows if row["itm_score"] is not None]
    low = min(scores)
    passing = {}  # image -> its scored captions' scores, best first
    for row in rows:
        if row["itm_score"] is not None:
            passing.setdefault(row["image_id"], []).append(row["itm_score"])
    passing = {image: sorted(values, reverse=True) for image, values in passing.items()}
    assert max(len(values) for values in passing.values()) == 4, "a web caption and 3 synthetic ones per image"

    rethreshold(target, low, best_per_image=1)
    best = target.read_samples()
    assert _kept_per_image(best) == {image: values[:1] for image, values in passing.items()}
    outranked = [row for row in best.to_pylist() if row["reject_reason"] == "itm_outranked"]
    assert len(outranked) == len(scores) - len(passing) and {row["reject_stage"] for row in outranked} == {"filter"}
    marker = json.loads(target.marker_path("filter", "00000").read_text())
    assert marker["best_per_image"] == 1 and marker["rejected"]["itm_outranked"] >= 1

    median = statistics.median(scores)
    run_filter(dataclasses.replace(config, threshold=median, best_per_image=2), target)  # stored scores, no model
    two = target.read_samples()
    assert _kept_per_image(two) == {
        image: [score for score in values if score >= median][:2]
        for image, values in passing.items()
        if values[0] >= median
    }
    rethreshold(target, median)  # keeps each shard's best_per_image
    assert target.read_samples().equals(two)
    rethreshold(target, median, best_per_image=0)
    _assert_decided_at(target.read_samples(), median)
    with pytest.raises(ValueError, match="best_per_image must be an integer ≥ 0"):
        dataclasses.replace(config, best_per_image=-1)


def test_a_rethreshold_with_a_truncated_part_stops_before_rewriting_any_shard(
    filtered, tmp_path, dataset_copier, no_inference
):
    target = dataset_copier(filtered, tmp_path)
    for shard in WEB_SHARDS:
        target.mark_done("rank", shard, {})
    last = target.part_path(WEB_SHARDS[-1])
    last.write_bytes(last.read_bytes()[:-100])
    before = {path: path.read_bytes() for path in target.path.rglob("*") if path.is_file()}
    with pytest.raises(ManifestError, match=f"{last.name}: unreadable Parquet file"):
        rethreshold(target, 0.9)
    assert {path: path.read_bytes() for path in target.path.rglob("*") if path.is_file()} == before
    assert all(target.is_done("rank", shard) for shard in WEB_SHARDS)


def test_scored_shards_refuse_another_filter_checkpoint(filtered, tiny_blip_checkpoint, tmp_path, no_inference):
    model, tokenizer, digest = load_checkpoint(tiny_blip_checkpoint)
    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    other = tmp_path / "other_filter"
    assert save_checkpoint(model, tokenizer, other) != digest
    with pytest.raises(ManifestError, match="was scored by the itm scorer with model sha256:"):
        run_filter(FilterConfig(other), filtered)


def test_bad_inputs_fail_before_any_work(
    captioned, filtered, tiny_blip_checkpoint, tiny_clip_checkpoint, tmp_path, no_inference
):
    with pytest.raises(ValueError, match="FilterConfig: the itm scorer's threshold is an ITM match probability"):
        FilterConfig(tiny_blip_checkpoint, threshold=1.5)
    with pytest.raises(ValueError, match="max_caption_chars must be >= 1"):
        FilterConfig(tiny_blip_checkpoint, max_caption_chars=0)
    with pytest.raises(ValueError, match="scorer must be one of itm, clip, got 'clap'"):
        FilterConfig(tiny_blip_checkpoint, scorer="clap")
    with pytest.raises(ValueError, match="the clip scorer needs clip_model"):
        FilterConfig(scorer="clip", clip_checkpoint=tiny_clip_checkpoint)
    with pytest.raises(ValueError, match="the clip scorer needs clip_checkpoint, a weights file; None"):
        FilterConfig(tiny_blip_checkpoint, scorer="clip", clip_model="clip_tiny")
    with pytest.raises(
        ValueError, match=r"the clip scorer's threshold is a CLIP cosine similarity and must be in \[-1, 1\]"
    ):
        FilterConfig(scorer="clip", clip_model="clip_tiny", clip_checkpoint=tiny_clip_checkpoint, threshold=1.2)
    with pytest.raises(ValueError, match="the itm scorer needs checkpoint"):
        FilterConfig(threshold=0.5)
    with pytest.raises(ValueError, match="threshold is an ITM match probability"):
        rethreshold(filtered, -0.1)  # stored ITM scores: the threshold is a probability
    with pytest.raises(ManifestError, match="the filter stage has not finished"):
        rethreshold(captioned, 0.5)
    with pytest.raises(ManifestError, match="no captioned shards; run the caption stage"):
        run_filter(FilterConfig(tiny_blip_checkpoint), Generation(tmp_path, "world", 1))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_manifest(
    captioned, tiny_blip_checkpoint, resumes_like_uninterrupted
):
    resumes_like_uninterrupted(run_filter, FilterConfig(tiny_blip_checkpoint, batch_size=1), captioned)


def test_the_clip_scorer_keeps_captions_whose_cosine_reaches_the_threshold(
    captioned, tiny_blip_checkpoint, tiny_clip_checkpoint, tmp_path, dataset_copier
):
    """DataComp / Nguyen et al.: one CLIP-score cut for web and synthetic captions; the score is open_clip's
    cosine similarity of the pair, and the reason names the scorer."""
    target = dataset_copier(captioned, tmp_path)
    config = FilterConfig(scorer="clip", clip_model="clip_tiny", clip_checkpoint=tiny_clip_checkpoint, batch_size=4)
    run_filter(config, target)
    rows = target.read_samples().to_pylist()
    scored = [row for row in rows if row["filter_clip_score"] is not None]
    assert len(scored) > 100 and all(row["itm_score"] is None and row["itc_score"] is None for row in rows)
    threshold = statistics.median(row["filter_clip_score"] for row in scored)
    target_at_median = dataset_copier(captioned, tmp_path / "median")
    run_filter(dataclasses.replace(config, threshold=threshold), target_at_median)
    decided = target_at_median.read_samples().to_pylist()
    for row in decided:
        if row["filter_clip_score"] is not None:
            assert row["kept"] == (row["filter_clip_score"] >= threshold)
            assert row["kept"] or row["reject_reason"] == "clip_below_threshold"
    assert 0.3 < sum(row["kept"] for row in decided if row["filter_clip_score"] is not None) / len(scored) < 0.7

    ranker = load_clip("clip_tiny", tiny_clip_checkpoint)
    store = ImageStore(target.path.parent)
    for row in [row for row in scored if row["caption_source"] == "synthetic"][:3] + [
        row for row in scored if row["caption_source"] == "web"
    ][:3]:
        pixels = ranker.preprocess(load_image(store.read(row["image_ref"]))).unsqueeze(0)
        text = normalize_caption(row["caption"], max_chars=300)[0]
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(
                ranker.model.encode_image(pixels), ranker.model.encode_text(ranker.tokenizer([text])), dim=-1
            )
        assert row["filter_clip_score"] == pytest.approx(float(cosine), abs=1e-4)

    marker = json.loads(target_at_median.marker_path("filter", "00000").read_text())
    assert (marker["scorer"], marker["threshold"]) == ("clip", threshold)
    rethreshold(target_at_median, -1.0)  # a cosine threshold: every scored row kept
    assert all(
        row["kept"] for row in target_at_median.read_samples().to_pylist() if row["filter_clip_score"] is not None
    )
    with pytest.raises(ManifestError, match="was scored by the clip scorer"):
        run_filter(FilterConfig(tiny_blip_checkpoint, threshold=0.5), target_at_median)


def test_capfilt_filter_with_the_clip_scorer(captioned, tiny_clip_checkpoint, tmp_path, dataset_copier, capsys):
    target = dataset_copier(captioned, tmp_path)
    where = ["--root", str(target.root), "--dataset", target.dataset, "--generation", "1"]
    clip = ["--scorer", "clip", "--clip-model", "clip_tiny", "--clip-checkpoint", str(tiny_clip_checkpoint)]
    assert cli_main(["filter", *where, *clip, "--threshold", "0.05"]) == 0
    rows = target.read_samples().to_pylist()
    scored = [row for row in rows if row["filter_clip_score"] is not None]
    assert scored and all(row["kept"] == (row["filter_clip_score"] >= 0.05) for row in scored)
    assert f"filter: {sum(row['kept'] for row in rows)} of {len(rows)} rows kept" in capsys.readouterr().out
    assert cli_main(["filter", *where, *clip, "--threshold", "1.5"]) == 2
    assert "the clip scorer's threshold is a CLIP cosine similarity" in capsys.readouterr().err
