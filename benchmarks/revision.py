"""Revision: is this working tree's vlp_core slower than another revision's? Caption, score and train on one
workload with each.

The baseline is `base` (a git revision, checked out in a temporary `git worktree`); ours is this working tree,
uncommitted changes included. Each repetition starts one fresh process per tree, in turns (the base first on
even repetitions, ours first on odd ones), and each process builds the model and times every work
(`benchmarks/revision_workload.py`: captions, scores, one pretraining step, at the base preset, random
weights, 224 px) after one untimed call; a repetition's time is the median of its process's timed calls.
This is how #16 checked that its GPU work left the CPU paths as fast as they were (BENCHMARKS.md §7).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Comparison, Report, load_1min, machine

HERE = Path(__file__).resolve().parents[1]  # this working tree
WORKLOAD = Path(__file__).with_name("revision_workload.py")
CALLS_PER_PROCESS, QUICK_CALLS = 2, 1
PRESET, QUICK_PRESET = "base", "tiny"  # quick: each tree's own tiny preset, to check that it runs


def _git(*arguments: str) -> str:
    result = subprocess.run(["git", "-C", str(HERE), *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(
            f"git {' '.join(arguments)} failed in {HERE} (bench revision needs a git checkout): {result.stderr}"
        )
    return result.stdout.strip()


def time_tree(workload: str, tree: Path, preset: str, calls: int) -> dict[str, dict]:
    """Each work's label, unit, count and seconds (the median of `calls` timed calls), from one fresh process
    running `workload` (the source of revision_workload.py) with `tree` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    settings = json.dumps({"preset": preset, "repeats": calls})
    with tempfile.TemporaryDirectory() as cwd:  # nothing of this tree's folder on sys.path
        result = subprocess.run(
            [sys.executable, "-c", workload, settings], env=env, cwd=cwd, capture_output=True, text=True
        )
    if result.returncode != 0:
        raise RuntimeError(f"the workload failed in {tree}:\n{result.stderr[-3000:]}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    return {work: timing | {"seconds": statistics.median(timing["seconds"])} for work, timing in timings.items()}


def run(quick: bool = False, repeats: int | None = None, base: str = "HEAD") -> Report:
    repeats = repeats or (1 if quick else 3)
    preset, calls = (QUICK_PRESET, QUICK_CALLS) if quick else (PRESET, CALLS_PER_PROCESS)
    commit = _git("rev-parse", "--short", f"{base}^{{commit}}")
    named = base if base == commit else f"{base} ({commit})"
    head = _git("rev-parse", "--short", "HEAD")
    changed = ", vlp_core changed" if _git("status", "--porcelain", "--untracked-files=no", "--", "vlp_core") else ""
    report = Report(
        "revision",
        quick,
        machine(),
        notes=[
            f"baseline: vlp_core of {named}; ours: this working tree ({head}{changed})",
            f"workload: preset {preset}, random weights, seed 0; one fresh process per tree and repetition, in turns; "
            f"a repetition's time is the median of {calls} timed call(s) after one untimed",
        ],
    )
    workload = WORKLOAD.read_text()  # once: every process of both sides runs the same source
    times: dict[str, list[dict[str, dict]]] = {"baseline": [], "ours": []}
    load_before = load_1min()
    with tempfile.TemporaryDirectory() as parent:
        worktree = Path(parent) / commit
        _git("worktree", "add", "--detach", str(worktree), commit)
        try:
            for repetition in range(repeats):
                order = [("baseline", worktree), ("ours", HERE)]
                for side, tree in order if repetition % 2 == 0 else order[::-1]:
                    times[side].append(time_tree(workload, tree, preset, calls))
        finally:
            _git("worktree", "remove", "--force", str(worktree))
    load_after = load_1min()
    for work, timing in times["ours"][0].items():
        report.comparisons.append(
            Comparison(
                timing["label"],
                timing["unit"],
                timing["count"],
                [process[work]["seconds"] for process in times["baseline"]],
                [process[work]["seconds"] for process in times["ours"]],
                load_before,
                load_after,
            )
        )
    return report
