"""Ablation arms on hand-made candidate rows: what each arm keeps and why, the derived generations
(written, resumable, with the human pairs) and the table built from evaluations."""

import json
import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from pipelines.manifests.manifest import (
    WRITER_LOCK,
    Generation,
    ManifestError,
    generation_counts,
    manifest_digest,
    samples_table,
)
from pipelines.report.ablation_table import (
    ABLATION_JSON,
    ablation_markdown,
    ablation_summary,
    arm_summary,
    read_ablation,
    seed_measures,
    spread,
    write_ablation,
)
from pipelines.report.report import ablation as report_ablation
from pipelines.stages.ablate import ARMS, STAGE, Arm, arm_generation, arm_rows, arms_named, derive_arm
from pipelines.stages.assemble import AssembleConfig, run_assemble
from pipelines.stages.shards import rows_table

THRESHOLD, TOP_K = 0.5, 2
THRESHOLDS = {"itm": THRESHOLD, "clip": 0.28}


def _row(
    image: str,
    source: str,
    caption: str,
    itm: float | None = None,
    clip: tuple[float, int] | None = None,
    clip_filter: float | None = None,
    reject: tuple[str, str] | None = None,
    image_ref: str | None = "00000.tar#x",
) -> dict:
    """A candidate row; `clip` is (clip_score, clip_rank)."""
    score, rank = clip or (None, None)
    row = samples_table(
        {
            "image_id": [image],
            "caption_source": [source],
            "caption": [caption],
            "image_ref": [image_ref],
            "generation": [1],
            "parent_generation": [0],
            "itm_score": [itm],
            "filter_clip_score": [clip_filter],
            "clip_score": [score],
            "clip_rank": [rank],
        }
    ).to_pylist()[0]
    if reject:
        row.update(kept=False, reject_stage=reject[0], reject_reason=reject[1])
    return row


def candidate_rows() -> list[dict]:
    """One scored shard as a CapFilt round leaves it at threshold 0.5, top-2."""
    return [
        _row("A", "web", "a web caption", itm=0.9, clip=(0.30, 2), reject=("rank", "clip_rank")),
        _row("A", "synthetic", "syn one", itm=0.8, clip=(0.50, 0)),
        _row("A", "synthetic", "syn two", itm=0.6, clip=(0.40, 1)),
        _row("A", "synthetic", "syn three", itm=0.1, reject=("filter", "itm_below_threshold")),
        _row("B", "web", "a noisy caption", itm=0.2, reject=("filter", "itm_below_threshold")),
        _row("B", "synthetic", "syn of b", itm=0.7, clip=(0.20, 0)),
        _row("C", "web", "", reject=("filter", "empty_caption")),
        _row("D", "web", "lost", reject=("download", "http_404"), image_ref=None),
        _row("E", "web", "a broken image", reject=("filter", "decode_error")),
    ]


def kept(rows: list[dict]) -> list[tuple[str, str]]:
    return [(row["image_id"], row["caption"]) for row in rows if row["kept"]]


def reasons(rows: list[dict]) -> dict[str, str]:
    return {row["caption"]: f"{row['reject_stage']}/{row['reject_reason']}" for row in rows if not row["kept"]}


UPSTREAM = {"": "filter/empty_caption", "lost": "download/http_404", "a broken image": "filter/decode_error"}


def test_no_capfilt_keeps_every_web_caption_with_an_image_and_excludes_synthetic() -> None:
    rows = arm_rows(candidate_rows(), ARMS["no_capfilt"], "itm", THRESHOLD, TOP_K)
    assert kept(rows) == [("A", "a web caption"), ("B", "a noisy caption")]
    assert reasons(rows) == {
        **UPSTREAM,
        "syn one": "ablate/synthetic_not_in_arm",
        "syn two": "ablate/synthetic_not_in_arm",
        "syn three": "ablate/synthetic_not_in_arm",
        "syn of b": "ablate/synthetic_not_in_arm",
    }
    assert [row["itm_score"] for row in rows][:2] == pytest.approx([0.9, 0.8]), "scores are kept"


def test_filter_only_keeps_web_captions_at_or_above_the_threshold() -> None:
    rows = arm_rows(candidate_rows(), ARMS["filter_only"], "itm", THRESHOLD, TOP_K)
    assert kept(rows) == [("A", "a web caption")]
    assert reasons(rows)["a noisy caption"] == "filter/itm_below_threshold"
    assert reasons(rows)["syn one"] == "ablate/synthetic_not_in_arm"


def test_captioner_only_keeps_every_web_and_synthetic_caption() -> None:
    rows = arm_rows(candidate_rows(), ARMS["captioner_only"], "itm", THRESHOLD, TOP_K)
    assert len(kept(rows)) == 6
    assert reasons(rows) == UPSTREAM, "only the non-score rejections stay"


def test_capfilt_filters_web_and_synthetic_alike_and_rank_keeps_the_clip_top_k() -> None:
    capfilt = arm_rows(candidate_rows(), ARMS["capfilt"], "itm", THRESHOLD, TOP_K)
    assert kept(capfilt) == [("A", "a web caption"), ("A", "syn one"), ("A", "syn two"), ("B", "syn of b")]
    assert reasons(capfilt)["syn three"] == reasons(capfilt)["a noisy caption"] == "filter/itm_below_threshold"

    ranked = arm_rows(candidate_rows(), ARMS["capfilt_rank"], "itm", THRESHOLD, TOP_K)
    assert kept(ranked) == [("A", "syn one"), ("A", "syn two"), ("B", "syn of b")]
    assert reasons(ranked)["a web caption"] == "rank/clip_rank"
    assert ranked == candidate_rows(), "at the candidates' own settings, the rank arm is the candidates"


def test_an_arm_re_decides_at_its_own_threshold_and_ranks_the_new_survivors() -> None:
    strict = arm_rows(candidate_rows(), ARMS["capfilt_rank"], "itm", 0.75, TOP_K)
    assert kept(strict) == [("A", "a web caption"), ("A", "syn one")]
    assert {row["caption"]: row["clip_rank"] for row in strict if row["kept"]} == {"a web caption": 1, "syn one": 0}
    assert reasons(strict)["syn two"] == reasons(strict)["syn of b"] == "filter/itm_below_threshold"

    loose = arm_rows(candidate_rows(), ARMS["capfilt"], "itm", 0.15, TOP_K)
    assert ("B", "a noisy caption") in kept(loose) and ("A", "syn three") not in kept(loose)
    with pytest.raises(ValueError, match="no clip_score"):  # B's web caption survives 0.15 but was never ranked
        arm_rows(candidate_rows(), ARMS["capfilt_rank"], "itm", 0.15, TOP_K)


def test_with_best_per_image_each_image_keeps_its_best_scored_passing_caption() -> None:
    capfilt = arm_rows(candidate_rows(), ARMS["capfilt"], "itm", THRESHOLD, TOP_K, best_per_image=1)
    assert kept(capfilt) == [("A", "a web caption"), ("B", "syn of b")]  # A's best is its web caption (0.9)
    assert reasons(capfilt)["syn one"] == reasons(capfilt)["syn two"] == "filter/itm_outranked"
    assert reasons(capfilt)["syn three"] == "filter/itm_below_threshold"
    two = arm_rows(candidate_rows(), ARMS["capfilt"], "itm", THRESHOLD, TOP_K, best_per_image=2)
    assert kept(two) == [("A", "a web caption"), ("A", "syn one"), ("B", "syn of b")]
    assert arm_rows(candidate_rows(), ARMS["filter_only"], "itm", THRESHOLD, TOP_K, best_per_image=1) == arm_rows(
        candidate_rows(), ARMS["filter_only"], "itm", THRESHOLD, TOP_K
    ), "one web caption per image: nothing to outrank"
    unfiltered = arm_rows(candidate_rows(), ARMS["captioner_only"], "itm", THRESHOLD, TOP_K, best_per_image=1)
    assert len(kept(unfiltered)) == 6, "the arms without the filter keep every caption"


def test_arm_names_are_checked() -> None:
    assert [arm.name for arm in arms_named(["capfilt", "no_capfilt"])] == ["capfilt", "no_capfilt"]
    for bad in (["capfilt", "capfilt"], ["nope"], []):
        with pytest.raises(ValueError, match="arms"):
            arms_named(bad)
    with pytest.raises(ValueError, match="rank needs the filter"):
        Arm("odd", captioner=True, filter=False, rank=True)
    with pytest.raises(ValueError, match="the ranker ranked the candidates' filter survivors"):
        Arm("odd", captioner=True, filter=True, rank=True, scorer="clip")


def test_the_clip_arms_decide_the_same_candidates_by_their_clip_score() -> None:
    """filter_only_clip / capfilt_clip: the ITM decisions lifted, a CLIP-score cut instead, the same captions."""
    clip_scores = {"a web caption": 0.31, "syn one": 0.12, "syn two": 0.29, "syn three": 0.35, "a noisy caption": 0.05,
                   "syn of b": 0.27}  # fmt: skip
    rows = [{**row, "filter_clip_score": clip_scores.get(row["caption"])} for row in candidate_rows()]
    capfilt = arm_rows(rows, ARMS["capfilt_clip"], "clip", 0.28, TOP_K)
    assert kept(capfilt) == [("A", "a web caption"), ("A", "syn two"), ("A", "syn three")]
    assert reasons(capfilt) == {
        "syn one": "filter/clip_below_threshold", "a noisy caption": "filter/clip_below_threshold",
        "syn of b": "filter/clip_below_threshold", **UPSTREAM,
    }  # fmt: skip
    web_only = arm_rows(rows, ARMS["filter_only_clip"], "clip", 0.28, TOP_K)
    assert kept(web_only) == [("A", "a web caption")]
    with pytest.raises(ValueError, match="has no clip score; add the clip scorer's scores to the candidates first"):
        arm_rows(candidate_rows(), ARMS["capfilt_clip"], "clip", 0.28, TOP_K)


# --------------------------------------------------------------------------- derived generations


@pytest.fixture
def human(tmp_path: Path) -> AssembleConfig:
    """Two human images with 2 and 1 captions."""
    root = tmp_path / "human"
    root.mkdir()
    for name, colour in (("h0.png", "red"), ("h1.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(root / name)
    entries = [
        {"image": "h0.png", "caption": ["a red square", "red"], "image_id": "0"},
        {"image": "h1.png", "caption": ["a blue square"], "image_id": "1"},
    ]
    (tmp_path / "human.json").write_text(json.dumps(entries))
    return AssembleConfig(tmp_path / "human.json", root)


@pytest.fixture
def candidates(tmp_path: Path, human: AssembleConfig) -> Generation:
    """A finished candidate generation: two ranked shards (the rows above split by image) and the human part."""
    generation = Generation(tmp_path / "manifests", "web", 1)
    rows = candidate_rows()
    for shard, images in (("00000", "AB"), ("00001", "CDE")):
        generation.write_part("caption", shard, rows_table([row for row in rows if row["image_id"] in images]), {})
        for stage in ("caption", "filter", "rank"):
            generation.mark_done(stage, shard, {"threshold": THRESHOLD, "top_k": TOP_K})
    run_assemble(
        human,
        generation,
        0,
        checkpoints={"filter": "sha256:f", "clip": "sha256:c"},
        stages=["caption", "filter", "rank"],
        config_digest="sha256:x",
    )
    return generation


def _mtimes(generation: Generation) -> dict[str, int]:
    return {
        str(p.relative_to(generation.path)): p.stat().st_mtime_ns
        for p in generation.path.rglob("*.*")
        if p.name != "generation.json"
    }


def test_derived_generation_holds_the_arm_rows_and_the_human_pairs(
    candidates: Generation, human: AssembleConfig
) -> None:
    arm = derive_arm(candidates, ARMS["capfilt"], human, THRESHOLDS, TOP_K)
    assert arm == arm_generation(candidates, ARMS["capfilt"]) and arm.path.parent.name == "ablate-capfilt"
    info = arm.read_info()
    assert info["stages"] == [STAGE, "assemble"] and info["parent_generation"] == 0
    assert info["checkpoints"] == {"filter": "sha256:f", "clip": "sha256:c"}
    assert info["counts"]["kept_by_source"] == {"human": 3, "synthetic": 3, "web": 1}
    assert "ablate/synthetic_not_in_arm" not in info["counts"]["rejected_by_stage_reason"]
    marker = json.loads(arm.marker_path(STAGE, "00000").read_text())
    assert (marker["rows"], marker["kept"], marker["threshold"]) == (6, 4, THRESHOLD)

    refs = {(row["caption_source"], row["image_ref"]) for row in arm.read_samples().to_pylist()}
    assert {ref for source, ref in refs if source == "web"} == {"../web/00000.tar#x", None}, (
        "relative to the arm's dataset folder, at the same file (the failed download has none)"
    )
    assert {ref for source, ref in refs if source == "human"} == {
        str((Path(human.human_image_root) / name).resolve()) for name in ("h0.png", "h1.png")
    }, "absolute refs stay"

    no_capfilt = derive_arm(candidates, ARMS["no_capfilt"], human, THRESHOLDS, TOP_K)
    counts = no_capfilt.read_info()["counts"]
    assert counts["kept_by_source"] == {"human": 3, "web": 2}
    assert counts["rejected_by_stage_reason"]["ablate/synthetic_not_in_arm"] == 4

    digest = manifest_digest(arm)
    best = derive_arm(candidates, ARMS["capfilt"], human, THRESHOLDS, TOP_K, best_per_image=1)
    assert best == arm and manifest_digest(best) != digest, "the same arm, re-derived by its new rule"
    assert best.read_info()["counts"]["kept_by_source"] == {"human": 3, "synthetic": 1, "web": 1}
    assert json.loads(best.marker_path(STAGE, "00000").read_text())["best_per_image"] == 1


def test_a_rerun_rewrites_nothing_and_a_changed_candidate_shard_is_redone(
    candidates: Generation, human: AssembleConfig
) -> None:
    arm = derive_arm(candidates, ARMS["capfilt"], human, THRESHOLDS, TOP_K)
    before, digest = _mtimes(arm), manifest_digest(arm)
    derive_arm(candidates, ARMS["capfilt"], human, THRESHOLDS, TOP_K)
    assert _mtimes(arm) == before and manifest_digest(arm) == digest

    # The candidates' filter re-decided shard 00000 at 0.65: syn two (ITM 0.6) is out there, and so in the arm.
    rows = [
        row
        if row["caption"] != "syn two"
        else {**row, "kept": False, "reject_stage": "filter", "reject_reason": "itm_below_threshold"}
        for row in candidates.read_samples().to_pylist()
        if row["image_id"] in "AB"
    ]
    candidates.write_part("rank", "00000", rows_table(rows), {})
    derive_arm(candidates, ARMS["capfilt"], human, {**THRESHOLDS, "itm": 0.65}, TOP_K)
    after = _mtimes(arm)
    assert after["samples/part-00000.parquet"] != before["samples/part-00000.parquet"]
    assert after["samples/part-human.parquet"] == before["samples/part-human.parquet"]
    assert arm.read_info()["counts"]["kept_by_source"] == {"human": 3, "synthetic": 2, "web": 1}


def test_a_torn_shard_is_redone_to_the_same_rows(candidates: Generation, human: AssembleConfig) -> None:
    arm = derive_arm(candidates, ARMS["filter_only"], human, THRESHOLDS, TOP_K)
    whole = arm.read_samples()
    arm.marker_path(STAGE, "00001").unlink()  # killed between the part and its marker
    derive_arm(candidates, ARMS["filter_only"], human, THRESHOLDS, TOP_K)
    assert arm.is_done(STAGE, "00001") and arm.read_samples().equals(whole)


def test_an_arm_being_written_by_another_run_is_not_touched(candidates: Generation, human: AssembleConfig) -> None:
    target = arm_generation(candidates, ARMS["capfilt"])
    target.path.mkdir(parents=True)
    alive = {"stage": STAGE, "pid": os.getppid(), "host": socket.gethostname(), "since": "now"}  # a live process
    (target.path / WRITER_LOCK).write_text(json.dumps(alive))
    with pytest.raises(ManifestError, match=rf"is being written by {STAGE} \(pid {os.getppid()} "):
        derive_arm(candidates, ARMS["capfilt"], human, THRESHOLDS, TOP_K)
    assert sorted(path.name for path in target.path.iterdir()) == [WRITER_LOCK]


# --------------------------------------------------------------------------- the table


def _evaluation(tr1: float, cider: float, accuracy: float | None = 0.5) -> dict:
    return {
        "retrieval": {"tr@1": tr1, "tr@5": 0.9, "ir@1": tr1 / 2, "ir@5": 0.8},
        "retrieval_itc": {"tr@1": tr1 + 0.1, "tr@5": 0.95, "ir@1": tr1 / 3, "ir@5": 0.85},
        "captioning": {"bleu_4": 0.1, "cider": cider},
        "world": {
            "test_caption_accuracy": {"mean": accuracy},
            "filter": {
                "precision": 0.75,
                "recall": 0.6,
                "removed": 4,
                "by_noise_type": {"clean": {"removal_rate": 0.1}, "empty": {"removal_rate": 1.0}},
            },
            "all_stages": None,
            "kept_caption_accuracy": None,
        },
    }


def test_measures_spread_and_table() -> None:
    counts = generation_counts([rows_table(candidate_rows() + [_row("H", "human", "a human caption")])])
    measures = seed_measures(counts, _evaluation(0.3, 1.2))
    assert measures["training_pairs"] == counts["kept"] == 4  # A's syn one and two, B's syn, H's caption
    assert measures["kept_ratio"] == pytest.approx(3 / 9)
    assert measures["ir@1"] == 0.15 and measures["caption_accuracy"] == 0.5
    assert measures["tr@1_itc"] == pytest.approx(0.4) and measures["ir@1_itc"] == pytest.approx(0.1)
    assert seed_measures(counts, {**_evaluation(0.3, 1.2), "retrieval_itc": None})["tr@1_itc"] is None  # older files

    assert spread([0.2, 0.4]) == pytest.approx({"n": 2, "mean": 0.3, "std": 0.1414213, "min": 0.2, "max": 0.4})
    assert spread([0.7]) == {"n": 1, "mean": 0.7, "std": 0.0, "min": 0.7, "max": 0.7}
    assert spread([0.7, None])["mean"] is None

    generation = {"path": "/g", "manifest_digest": "sha256:g", "counts": counts}
    runs = [
        {
            "seed": seed,
            "checkpoint": f"sha256:{seed}",
            "run_dir": "/r",
            "evaluation_file": "/e",
            "evaluation": _evaluation(tr1, 1.0),
        }
        for seed, tr1 in ((0, 0.2), (1, 0.4))
    ]
    entry = arm_summary({"name": "capfilt", "captioner": True, "filter": True, "rank": False}, generation, runs)
    assert entry["per_seed"]["1"]["tr@1"] == 0.4 and entry["summary"]["tr@1"]["mean"] == pytest.approx(0.3)
    summary = ablation_summary(
        [entry],
        seeds=[0, 1],
        settings={"pretrain_steps": 10, "batch_size": 8, "num_captions": 1},
        candidates={"path": "/c", "manifest_digest": "sha256:c"},
        world={"seed": 0, "n_web": 60, "noise_rates": {"clean": 0.5, "empty": 0.5}},
    )
    markdown = ablation_markdown(summary)
    assert "| capfilt | ✓ | ✓ |  | 4 | 0.333 ± 0.000 | 0.300 ± 0.141 |" in markdown
    assert "| capfilt | 0.750 | 0.600 | 0.10 | 1.00 |" in markdown
    assert "noise rates clean 0.5, empty 0.5" in markdown
    assert ", 1 synthetic caption per image (captioner: blip)" in markdown

    figure = report_ablation(summary)
    assert figure["rows"][0]["name"] == "capfilt" and figure["rows"][0]["tr@1"]["max"] == 0.4
    assert figure["filter"] == [{"name": "capfilt", "precision": 0.75, "recall": 0.6}]


def test_write_and_read_ablation(tmp_path: Path) -> None:
    summary = ablation_summary(
        [], seeds=[0], settings={}, candidates={"path": "/c", "manifest_digest": "x"}, world=None
    )
    assert read_ablation(tmp_path) is None
    table = write_ablation(tmp_path, summary)
    assert table.read_text().startswith("# CapFilt ablation") and read_ablation(tmp_path) == summary
    assert (tmp_path / ABLATION_JSON).is_file()
