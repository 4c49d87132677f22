"""Every benchmark runs in its quick mode through `capfilt bench NAME --quick` and reports well-formed
numbers. Speeds are never asserted: only that each side was measured and each ratio was printed."""

import json
from pathlib import Path

import pytest
import torch
from released_captioners import RELEASED_CAPTIONERS

from benchmarks import gpu_profile
from benchmarks.cli import BENCHMARKS
from flows.cli import main

SLOW = {"download", "end-to-end", "scale", "revision"}  # img2dataset's start-up; flow runs; fresh processes


def _positive(values: list[float]) -> bool:
    return len(values) > 0 and all(value > 0 for value in values)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in BENCHMARKS]
)
def test_quick_benchmark_reports(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", name, "--quick", "--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    (report,) = json.loads((tmp_path / "report.json").read_text())
    assert report["benchmark"] == name and report["quick"] is True
    assert f"== bench {name} (quick)" in printed and "load average" in printed
    machine = report["machine"]
    assert machine["cores"] >= 1 and len(machine["load_average"]) == 3 and machine["cpu"]
    assert report["comparisons"] or report["measurements"]
    for comparison in report["comparisons"]:
        assert _positive(comparison["baseline_s"]) and _positive(comparison["ours_s"])
        ratio = comparison["ratio"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert f"{comparison['label']}: ratio ours/baseline speed median {ratio['median']:.2f}x" in printed
    for measurement in report["measurements"]:
        assert _positive(measurement["seconds"]) and measurement["rate"] > 0
        assert measurement["label"] in printed
    if name == "training":  # the arithmetic each step achieved (MFU only on a GPU of known peak)
        for measurement in report["measurements"]:
            flops_per_second = measurement["extra"]["TFLOP/s"] * 1e12
            assert 0 < flops_per_second * measurement["work"] / measurement["rate"] < 1e12  # FLOPs of one tiny step
            assert "MFU" not in measurement["extra"] or torch.cuda.is_available()
    if name == "scale":  # every reader at both sizes, with its memory
        assert len(report["measurements"]) == 2 * 5
        assert all(0 < m["extra"]["RSS after imports MB"] <= m["extra"]["peak RSS MB"] for m in report["measurements"])
    if name == "caption":  # the output-distribution check is printed side by side
        figures = report["figures"]
        for side in ("ours", "transformers"):
            assert figures[f"sampled {side}: captions"] == 4 * 10  # quick: the largest batch is 4 images, K = 10
            assert 0 < figures[f"sampled {side}: mean_length"] <= 30
        assert 0 <= figures["token distribution TV distance ours vs transformers"] <= 1
        same, total = map(int, figures["greedy captions identical to transformers"].split("/"))
        assert total == 16 and 0 <= same <= total
    flops = {label: value for label, value in report["figures"].items() if label.endswith("TFLOP/s")}
    if name == "caption":  # ours at each batch size
        assert set(flops) == {"batch 1, ours: TFLOP/s", "batch 4, ours: TFLOP/s"} and min(flops.values()) > 0
    if name == "scoring":
        assert set(flops) == {"ours: TFLOP/s"} and flops["ours: TFLOP/s"] > 0
    if name == "revision":  # each work of the workload, HEAD's vlp_core against this tree's
        assert [c["label"].split(":")[0] for c in report["comparisons"]] == ["caption", "score", "train_step"]
        assert all(len(c["baseline_s"]) == len(c["ours_s"]) == 1 for c in report["comparisons"])


def test_bad_repeats_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "scoring", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_an_unknown_base_revision_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "revision", "--quick", "--base", "no-such-revision"]) == 2
    assert "git rev-parse --short no-such-revision^{commit} failed" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["llava", "coca"])  # against transformers' own sampler / alone
def test_quick_caption_backend_benchmark(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = RELEASED_CAPTIONERS[backend](tmp_path / backend)
    options = ["--backend", backend, "--checkpoint", str(folder), "--json", str(tmp_path / "report.json")]
    assert main(["bench", "caption", "--quick", *options]) == 0
    (report,) = json.loads((tmp_path / "report.json").read_text())
    assert report["benchmark"] == f"caption --backend {backend}"
    timed = report["comparisons"] if backend == "llava" else report["measurements"]
    assert len(timed) == 1 and "batch 2 images x 10 captions" in capsys.readouterr().out
    assert report["figures"]["example"]
    assert main(["bench", "caption", "--quick", "--backend", backend]) == 2  # a backend's folder is needed


def test_the_gpu_profile_runs_at_quick_sizes(capsys: pytest.CaptureFixture) -> None:
    """What gpu_check.sh runs last: each work's wall time and its top operations (CPU time without a GPU)."""
    gpu_profile.main(["--quick"])
    printed = capsys.readouterr().out
    for label in (
        "== caption: tiny at 48 px, 4 images x K=10: wall",
        "== pretraining step: tiny at 48 px, batch 8: wall",
    ):
        assert label in printed
    assert printed.count("aten::") >= 2 * 10  # a table of the busiest operations for each
    assert ("GPU busy" in printed) == torch.cuda.is_available()
