"""`capfilt run` stopped while the captioner and the filter fine-tune side by side, in child processes (the Ray
executor: Ray's own SIGTERM handler is in place by then), by SIGTERM to the command or by Ctrl-C in a terminal
(SIGINT to its whole process group): it exits at once with 128 + the signal's number, and nothing it started
is left running (Prefect's temporary server, the training children, Ray)."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import processes_with_env, wait_until

pytestmark = pytest.mark.slow

# The smoke preset, with fine-tunings that would run for hours, two training cores (side by side), and two
# Ray tasks for the evaluation before them (one would run in the command's process: no Ray would start)
LONG_FINE_TUNES = """
import dataclasses, sys
from flows.cli import main
from flows.settings import RUN_PRESETS
RUN_PRESETS["smoke"] = dataclasses.replace(
    RUN_PRESETS["smoke"], captioner_steps=10**6, filter_steps=10**6, train_cpus=2, concurrency=2
)
sys.exit(main(sys.argv[1:]))
"""


def _started_by(home: Path) -> dict[int, str]:
    """Every process the run started (and the run itself): they have its PREFECT_HOME in their environment."""
    return processes_with_env("PREFECT_HOME", str(home))


def _children(home: Path, kind: str) -> list[str]:
    """The command lines of the run's processes that name `kind`."""
    return [command for command in _started_by(home).values() if kind in command]


def _fine_tuning_side_by_side(run: subprocess.Popen, stderr: Path, home: Path) -> bool:
    """Both fine-tunings have started, and two child processes run (or the run has ended)."""
    started = all(f"▸ finetune-{role}" in stderr.read_text() for role in ("captioner", "filter"))
    return (started and len(_children(home, "multiprocessing.spawn")) == 2) or run.poll() is not None


@pytest.mark.parametrize(
    "stop_signal, to_group",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-to-the-command", "ctrl-c-in-a-terminal"],  # Ctrl-C: SIGINT to the whole foreground group
)
def test_a_stop_signal_during_side_by_side_fine_tunes_ends_everything(
    tmp_path: Path, stop_signal: int, to_group: bool
) -> None:
    home = tmp_path / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home), "CAPFILT_EXECUTOR": "ray"}
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, started by the run
    env.pop("PREFECT_API_URL", None)  # a temporary Prefect server of its own
    run_options = ["run", "--preset", "smoke", "--n-web", "20", "--out", str(tmp_path / "run")]
    command = [sys.executable, "-c", LONG_FINE_TUNES, *run_options]
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as stream:
        run = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=stream, start_new_session=True)
    try:
        wait_until(lambda: _fine_tuning_side_by_side(run, stderr, home), "both fine-tunings in child processes", 600)
        assert run.poll() is None, stderr.read_text()[-3000:]
        assert _children(home, "ray") and _children(home, "uvicorn"), "Ray and Prefect's server run"
        (os.killpg if to_group else os.kill)(run.pid, stop_signal)
        run.wait(timeout=60)  # not the hours the fine-tunings would take, nor retries to a stopped Prefect server
        wait_until(lambda: not _started_by(home), "every process the run started gone", 60)
    finally:
        run.kill()  # nothing once it has ended (Popen knows; its PID may be another process's by then)
        for pid in _started_by(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert run.returncode == 128 + stop_signal
    said = stderr.read_text()
    assert f"capfilt run: stopped by {signal.Signals(stop_signal).name}; running it again resumes" in said
    assert "Traceback" not in said, said[-3000:]
    assert "✗ finetune-captioner  captioner: its training process ended abruptly (stopped" in said
