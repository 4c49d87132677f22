"""`capfilt ablate` end to end: the real flow (Prefect, Ray, img2dataset on a served world) with the smoke
preset, four arms (an ITM and a CLIP-score filter among them) × two seeds, and a second captioner (a
BLIP-2 stand-in) compared on the arms with synthetic captions; the table, the arms' training data against
their rules, a re-run that reuses everything, and the report's ablation section. With two training cores
the captioner and the filter fine-tune side by side, in child processes, and so do the arms' pretrainings.
The CLIP ranker's top 3 keeps every caption of an image (the web one and two synthetic), so capfilt_rank
keeps capfilt's pairs and shares its models and evaluations, as in the tiny preset with one synthetic
caption and top 2."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from released_captioners import blip2_folder

from flows.settings import RUN_PRESETS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ARMS, SEEDS = ["no_capfilt", "capfilt", "capfilt_rank", "capfilt_clip"], [0, 1]  # ITM against a CLIP-score cut
COMPARED = ["capfilt_blip2", "capfilt_rank_blip2", "capfilt_clip_blip2"]  # the arms with synthetic captions, blip2's
SHARED = {"capfilt_rank": "capfilt", "capfilt_rank_blip2": "capfilt_blip2"}  # arm → the arm whose pairs it keeps


def _ablate(out: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(home)}  # an ephemeral Prefect of its own
    blip2 = out / "blip2-stand-in"
    if not blip2.is_dir():
        blip2_folder(blip2)
    command = [
        str(BIN / "capfilt"), "ablate", "--preset", "smoke", "--out", str(out), "--train-cpus", "2", "--top-k", "3",
        "--arms", ",".join(ARMS), "--seeds", ",".join(map(str, SEEDS)),
        "--compare-captioner-backend", "blip2", "--compare-captioner-checkpoint", str(blip2),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory: pytest.TempPathFactory):
    out, home = tmp_path_factory.mktemp("ablate"), tmp_path_factory.mktemp("prefect-home")
    result = _ablate(out, home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, home, result.stdout


def test_the_table_has_every_arm_and_seed(ablation_run) -> None:
    out, _, stdout = ablation_run
    candidates = out / "data_manifests" / "web" / "gen-0001"
    summary = json.loads((candidates / "ablation.json").read_text())
    assert "| arm | C | F | rank | pairs | kept ratio | TR@1 |" in stdout
    assert "| no_capfilt |  |  |  |" in stdout and "| capfilt | ✓ | ✓ |  |" in stdout

    assert [arm["arm"]["name"] for arm in summary["arms"]] == ARMS + COMPARED and summary["seeds"] == SEEDS
    assert summary["settings"]["pretrain_steps"] == RUN_PRESETS["smoke"].pretrain_steps
    assert summary["world"]["noise_rates"] == dict(RUN_PRESETS["smoke"].world.noise_rates)
    assert summary["world"]["n_test"] == RUN_PRESETS["smoke"].ablation_n_test != RUN_PRESETS["smoke"].world.n_test
    assert set(summary["candidates"]["checkpoints"]) == {"pretrained", "captioner", "filter", "clip"}
    log = (out / "capfilt.log").read_text()
    for role in ("captioner", "filter"):
        assert re.search(rf"{role}: \d+ pairs, \d+ steps .* in a child process", log), role
    for arm in summary["arms"]:
        assert set(arm["per_seed"]) == {"0", "1"}
        for measure, values in arm["summary"].items():
            per_seed = [arm["per_seed"][seed][measure] for seed in ("0", "1")]
            assert values["n"] == 2 and values["min"] == min(per_seed) and values["max"] == max(per_seed)
            assert values["min"] <= values["mean"] <= values["max"]
        assert 0 <= arm["summary"]["tr@1"]["mean"] <= 1 and arm["summary"]["caption_accuracy"]["mean"] is not None
        checkpoints = [run["checkpoint"] for run in arm["runs"]]
        assert len(set(checkpoints)) == 2, "each seed trains its own model"
    no_capfilt, capfilt, *_ = summary["arms"]
    removed = no_capfilt["data"]["filter"]["by_noise_type"]
    assert no_capfilt["data"]["filter"]["removed"] == removed["empty"]["removed"], "no ITM filter: empty ones only"
    rows = pq.read_table(out / "data_manifests" / "web" / "gen-0001" / "samples").to_pylist()
    threshold = summary["settings"]["itm_threshold"]
    below = sum(
        row["caption_source"] == "web" and row["itm_score"] is not None and row["itm_score"] < threshold for row in rows
    )
    assert capfilt["data"]["filter"]["removed"] == no_capfilt["data"]["filter"]["removed"] + below, (
        "the ITM filter leaves out the scored web captions below the threshold as well"
    )
    assert {run["checkpoint"] for run in no_capfilt["runs"]}.isdisjoint(run["checkpoint"] for run in capfilt["runs"])


def test_arms_train_on_the_pairs_their_rules_keep(ablation_run) -> None:
    out, _, _ = ablation_run
    candidates = out / "data_manifests" / "web" / "gen-0001"
    summary = json.loads((candidates / "ablation.json").read_text())
    rows = pq.read_table(candidates / "samples").to_pylist()
    threshold, clip_threshold = summary["settings"]["itm_threshold"], summary["settings"]["clip_threshold"]
    human = sum(row["caption_source"] == "human" and row["kept"] for row in rows)
    scored_web = sum(row["caption_source"] == "web" and row["itm_score"] is not None for row in rows)
    assert all((row["filter_clip_score"] is None) == (row["itm_score"] is None) for row in rows), "the score stage ran"
    passing = sum(row["caption_source"] != "human" and (row["itm_score"] or 0) >= threshold for row in rows)
    clip_passing = sum(
        row["caption_source"] != "human" and (row["filter_clip_score"] or -1) >= clip_threshold for row in rows
    )
    candidate_rows = sum(row["caption_source"] != "human" for row in rows)
    expected = {"no_capfilt": scored_web + human, "capfilt": passing + human, "capfilt_rank": passing + human,
                "capfilt_clip": clip_passing + human}  # fmt: skip
    arms = summary["arms"][: len(ARMS)]  # those of these candidates (the compared captioner's: the test below)
    for arm in arms:
        name = arm["arm"]["name"]
        assert arm["generation"]["counts"]["kept"] == expected[name]
        assert arm["per_seed"]["0"]["training_pairs"] == arm["per_seed"]["1"]["training_pairs"] == expected[name]
        assert arm["per_seed"]["0"]["kept_ratio"] == pytest.approx((expected[name] - human) / candidate_rows)
        assert arm["generation"]["counts"]["rows_by_source"]["synthetic"] > 0
    synthetic_passing = [
        sum(row["caption_source"] == "synthetic" and (row[column] or -1) >= cut for row in rows)
        for column, cut in (("itm_score", threshold), ("filter_clip_score", clip_threshold))
    ]
    kept_synthetic = [arm["generation"]["counts"]["kept_by_source"].get("synthetic", 0) for arm in arms]
    assert kept_synthetic == [0, synthetic_passing[0], *synthetic_passing]


def test_the_report_of_the_candidates_has_the_ablation_section(ablation_run) -> None:
    out, _, _ = ablation_run
    report = out / "data_manifests" / "web" / "gen-0001" / "report"
    figures = json.loads((report / "report.json").read_text())
    assert [row["name"] for row in figures["ablation"]["rows"]] == ARMS + COMPARED
    page = (report / "index.html").read_text()
    assert 'id="ablation"' in page and "no_capfilt" in page and "mean ± std over seeds 0, 1" in page


def test_the_arms_pretrain_two_at_a_time_in_child_processes(ablation_run) -> None:
    out, _, _ = ablation_run
    log = (out / "capfilt.log").read_text()
    arms, trained = len(ARMS) + len(COMPARED), len(ARMS) + len(COMPARED) - len(SHARED)
    assert f"{trained * len(SEEDS)} pretrainings for {arms} arm(s) x {len(SEEDS)} seed(s)" in log
    assert len(re.findall(r"pretrain: \d+ pairs, .* in a child process", log)) == trained * len(SEEDS)
    assert len(re.findall(r"pretrain: \d+ pairs, .* in this process", log)) == 1, "generation 0's, alone"
    running, most = 0, 0
    for mark in re.findall(r"([▸✓]) pretrain ", log):
        running += 1 if mark == "▸" else -1
        most = max(most, running)
    assert most == 2


def test_arms_that_keep_the_same_pairs_share_their_models_and_evaluations(ablation_run) -> None:
    out, _, _ = ablation_run
    summary = json.loads((out / "data_manifests" / "web" / "gen-0001" / "ablation.json").read_text())
    arms = {arm["arm"]["name"]: arm for arm in summary["arms"]}
    log = (out / "capfilt.log").read_text()
    evaluated = re.findall(r"pipelines\.stages\.evaluate: evaluate: \S+ on (\S+) gen 1", log)
    assert sorted(evaluated) == sorted(f"ablate-{arm}" for arm in arms if arm not in SHARED for _ in SEEDS)
    for name, same in SHARED.items():
        assert arms[name]["generation"]["manifest_digest"] == arms[same]["generation"]["manifest_digest"]
        assert arms[name]["per_seed"] == arms[same]["per_seed"]
        for run, its in zip(arms[name]["runs"], arms[same]["runs"], strict=True):
            assert run["checkpoint"] == its["checkpoint"]
            copy, original = (json.loads(Path(r["evaluation_file"]).read_text()) for r in (run, its))
            assert copy["dataset"] == f"ablate-{name}" and original["dataset"] == f"ablate-{same}"
            assert {**copy, "dataset": None} == {**original, "dataset": None}


def test_a_rerun_reuses_every_training_and_evaluation(ablation_run) -> None:
    out, home, _ = ablation_run
    trainings, manifests = _files(out / "train"), _files(out / "data_manifests")
    before = json.loads((out / "data_manifests" / "web" / "gen-0001" / "ablation.json").read_text())

    again = _ablate(out, home)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert _files(out / "train") == trainings, "no training ran again"
    after = _files(out / "data_manifests")
    unchanged = {
        path: mtime
        for path, mtime in manifests.items()
        if "/report/" not in path and not path.endswith(("generation.json", "ablation.json", "ablation.md"))
    }
    assert {path: after.get(path) for path in unchanged} == unchanged, "parts, markers and evaluations are reused"
    assert json.loads((out / "data_manifests" / "web" / "gen-0001" / "ablation.json").read_text()) == before


def test_two_captioners_are_compared_on_the_same_web_images_filter_and_ranker(ablation_run) -> None:
    """The compared captioner's round (`web-blip2`) shares everything with the candidates but the captioner,
    and its arms keep its synthetic captions by the same rules."""
    out, _, stdout = ablation_run
    assert "| capfilt_blip2 | ✓ | ✓ |" in stdout
    root = out / "data_manifests"
    summary = json.loads((root / "web" / "gen-0001" / "ablation.json").read_text())
    ours, theirs = (pq.read_table(root / name / "gen-0001" / "samples").to_pylist() for name in ("web", "web-blip2"))
    assert {row["caption_backend"] for row in ours if row["caption_source"] == "synthetic"} == {"blip"}
    assert {row["caption_backend"] for row in theirs if row["caption_source"] == "synthetic"} == {"blip2"}
    web_scores = [{row["sample_id"]: row["itm_score"] for row in rows if row["caption_source"] == "web"}
                  for rows in (ours, theirs)]  # fmt: skip
    assert web_scores[0] == web_scores[1], "the same web captions, scored by the same filter"
    checkpoints = [summary["candidates"]["checkpoints"], summary["candidates"]["compared"][0]["checkpoints"]]
    assert checkpoints[0]["filter"] == checkpoints[1]["filter"] and checkpoints[0]["clip"] == checkpoints[1]["clip"]
    assert checkpoints[0]["captioner"] != checkpoints[1]["captioner"]

    threshold = summary["settings"]["itm_threshold"]
    arm = pq.read_table(root / "ablate-capfilt_blip2" / "gen-0001" / "samples").to_pylist()
    kept_synthetic = [row for row in arm if row["kept"] and row["caption_source"] == "synthetic"]
    assert {row["caption_backend"] for row in kept_synthetic} <= {"blip2"}
    assert len(kept_synthetic) == sum(
        row["caption_source"] == "synthetic" and (row["itm_score"] or 0) >= threshold for row in theirs
    )
