"""End to end and scaling: `capfilt run --preset P` at 1x, 2x (and 4x) the preset's web pairs.

Each scale runs the console script in a fresh folder with its own PREFECT_HOME (an ephemeral Prefect
server with its own database), so the time per stage is Prefect's own record of each task run. The
goal is linear scaling: 2x the pairs in at most 2.2x the time. Training stages run a fixed number of
steps, so they do not grow with the pairs; the per-sample stages (download, caption, filter, rank)
and the whole run are reported against the pairs. There is no baseline: the figure is the slope.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from benchmarks.harness import Measurement, Report, load_1min, machine

SCALES, QUICK_SCALES = (1, 2, 4), (1,)  # quick: one small run, to keep the benchmark from rotting
QUICK_ROUNDS = 0  # quick: generation 0 only (download, CLIP, pretrain, evaluate, report)
PER_SAMPLE_STAGES = ("download", "caption", "filter", "rank")


def stage_seconds(prefect_home: Path) -> dict[str, float]:
    """Seconds per task, summed over its runs (e.g. both pretrainings), from the run's Prefect database."""
    with sqlite3.connect(prefect_home / "prefect.db") as database:
        rows = database.execute("SELECT name, start_time, end_time FROM task_run WHERE end_time IS NOT NULL")
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in rows:
            task = name.rsplit("-", 1)[0]  # task run names are "<task>-<3 hex>"
            totals[task] += (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return dict(totals)


def run_flow(preset: str, out: Path, n_web: int | None, rounds: int | None = None) -> tuple[float, dict[str, float]]:
    """Run `capfilt run` in a subprocess; returns its wall time and the seconds per stage."""
    prefect_home = out / "prefect-home"
    prefect_home.mkdir(parents=True)
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home)
    command = [str(Path(sys.executable).parent / "capfilt"), "run", "--preset", preset, "--out", str(out)]
    command += ["--n-web", str(n_web)] if n_web else []
    command += ["--rounds", str(rounds)] if rounds is not None else []
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, stage_seconds(prefect_home)


def world_pairs(out: Path) -> int:
    return json.loads((out / "world" / "world.json").read_text())["config"]["n_web"]


def run(quick: bool = False, repeats: int | None = None, preset: str | None = None) -> Report:
    preset = preset or ("smoke" if quick else "tiny")
    scales = QUICK_SCALES if quick else SCALES
    report = Report(
        "end-to-end",
        quick,
        machine(),
        notes=[
            f"`capfilt run --preset {preset}` at {', '.join(f'{s}x' for s in scales)} web pairs, once each "
            "(a run is minutes long); stage times from each run's Prefect task runs",
            *(["quick: generation 0 only (--rounds 0)"] if quick else []),
        ],
    )
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-e2e-") as folder:
        base_pairs = None
        totals = {}
        for scale in scales:
            out = Path(folder) / f"{scale}x"
            load_before = load_1min()
            seconds, stages = run_flow(preset, out, base_pairs and base_pairs * scale, QUICK_ROUNDS if quick else None)
            base_pairs = base_pairs or world_pairs(out)
            pairs = base_pairs * scale
            totals[scale] = seconds
            per_sample = sum(stages.get(stage, 0.0) for stage in PER_SAMPLE_STAGES)
            report.measurements.append(
                Measurement(
                    f"{scale}x ({pairs} web pairs)",
                    "pairs/s",
                    pairs,
                    [seconds],
                    load_before,
                    load_1min(),
                    extra={
                        "per-sample stages s": round(per_sample, 1),
                        **{f"{stage} s": round(value, 1) for stage, value in sorted(stages.items())},
                    },
                )
            )
            report.figures[f"{scale}x per-sample stages (s)"] = per_sample
    for scale in scales[1:]:
        report.figures[f"time {scale}x / 1x (linear: {scale}, goal <= {1.1 * scale:.1f})"] = totals[scale] / totals[1]
    return report
