"""`capfilt run` stopped by SIGTERM while the captioner and the filter fine-tune side by side, in child
processes (the Ray executor: Ray's own SIGTERM handler is in place by then): it exits at once with 143,
and nothing it started is left running (Prefect's temporary server, the training children, Ray)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import stop_group, wait_until

pytestmark = pytest.mark.slow

# The smoke preset, with fine-tunings that would run for hours and two training cores (side by side)
LONG_FINE_TUNES = """
import dataclasses, sys
from flows.cli import main
from flows.settings import RUN_PRESETS
RUN_PRESETS["smoke"] = dataclasses.replace(
    RUN_PRESETS["smoke"], captioner_steps=10**6, filter_steps=10**6, train_cpus=2
)
sys.exit(main(sys.argv[1:]))
"""


def _session(session_id: int) -> dict[int, str]:
    """The command line of every live process of the session `session_id`, by PID."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # not a process, or it has just ended
            continue
        state, _, _, session, *_ = stat.rsplit(")", 1)[1].split()  # after the name: state, ppid, pgrp, session
        if int(session) == session_id and state != "Z":
            found[int(entry.name)] = command
    return found


def _fine_tuning_side_by_side(run: subprocess.Popen, stderr: Path) -> bool:
    """Both fine-tunings have started, and two child processes run (or the run has ended)."""
    started = all(f"▸ finetune-{role}" in stderr.read_text() for role in ("captioner", "filter"))
    children = [command for command in _session(run.pid).values() if "multiprocessing.spawn" in command]
    return (started and len(children) == 2) or run.poll() is not None


def test_sigterm_during_side_by_side_fine_tunes_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "CAPFILT_EXECUTOR": "ray"}
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, started by the run
    run_options = ["run", "--preset", "smoke", "--n-web", "20", "--out", str(tmp_path / "run")]
    command = [sys.executable, "-c", LONG_FINE_TUNES, *run_options]
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as stream:
        run = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=stream, start_new_session=True)
    try:
        wait_until(lambda: _fine_tuning_side_by_side(run, stderr), "both fine-tunings in child processes", 600)
        assert run.poll() is None, stderr.read_text()[-3000:]
        assert any("ray" in command for command in _session(run.pid).values()), "Ray runs in the session"
        os.kill(run.pid, signal.SIGTERM)
        run.wait(timeout=120)  # not the hours the fine-tunings would take
        wait_until(lambda: not _session(run.pid), "every process the run started gone", 60)
    finally:
        if run.poll() is None or _session(run.pid):
            stop_group(run, signal.SIGKILL)
    assert run.returncode == 128 + signal.SIGTERM
    said = stderr.read_text()
    assert "capfilt run: stopped by SIGTERM; running it again resumes" in said
    assert "Traceback" not in said, said[-3000:]
    assert "✗ finetune-captioner  captioner: its training process ended abruptly (stopped" in said
