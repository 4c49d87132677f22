"""The console of long commands: the terminal gets stage lines, capfilt's warnings and progress bars; the
log file in the run folder gets everything else, whoever writes it (Python, a C library, a child process)."""

import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from pathlib import Path
    from pipelines.cli.console import command_console
    from pipelines.progress import announce, progress

    logging.basicConfig(level=logging.INFO)
    stage = logging.getLogger("pipelines.stages.caption")
    with command_console(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose") as log_file:
        announce(stage, "▸ caption  web gen 0")
        stage.info("caption: shard 00000 done")
        stage.warning("3 images could not be decoded")
        logging.getLogger("ray.data").info("Starting execution of Dataset")
        logging.getLogger("ray").warning("Token authentication is enabled")
        print("Downloading starting now")
        os.write(2, b"[core_worker.cc:2465] written below Python\\n")
        subprocess.run([sys.executable, "-c", "print('a child process of the command')"], check=True)
        with progress("caption", total=40, unit="images") as advance:
            for _ in range(40):
                advance()
        announce(stage, "✓ caption  174 rows, 171 kept  (6 s)")
    print(f"summary; log: {log_file}")
    """
)
ON_TERMINAL = ["▸ caption  web gen 0", "warning: 3 images could not be decoded", "✓ caption  174 rows, 171 kept  (6 s)"]
ONLY_IN_THE_LOG = [
    "caption: shard 00000 done",
    "Starting execution of Dataset",
    "Token authentication is enabled",
    "Downloading starting now",
    "[core_worker.cc:2465] written below Python",
    "a child process of the command",
]


def _run_child(run_dir: Path, mode: str = "quiet", **streams) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(run_dir), mode], text=True, timeout=120, check=True, **streams
    )


def test_the_terminal_shows_stage_lines_and_warnings_and_the_log_file_the_rest(tmp_path: Path) -> None:
    result = _run_child(tmp_path / "run", capture_output=True)
    assert result.stderr.splitlines() == ON_TERMINAL, "on a pipe: no bars, nothing else"
    assert result.stdout.splitlines() == [f"summary; log: {tmp_path / 'run' / 'capfilt.log'}"]
    log = (tmp_path / "run" / "capfilt.log").read_text()
    shown_too = [line.removeprefix("warning: ") for line in ON_TERMINAL]
    assert all(line in log for line in ONLY_IN_THE_LOG + shown_too), log
    assert "summary" not in log, "after the command, the terminal is the terminal again"


def test_verbose_keeps_everything_on_the_terminal_and_writes_the_file_too(tmp_path: Path) -> None:
    result = _run_child(tmp_path / "run", "verbose", capture_output=True)
    terminal = result.stdout + result.stderr
    assert all(line in terminal for line in ONLY_IN_THE_LOG)
    assert "caption: shard 00000 done" in (tmp_path / "run" / "capfilt.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal")
def test_a_terminal_gets_a_progress_bar_with_count_rate_and_eta(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    with os.fdopen(leader, "rb", buffering=0) as screen:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "run"), "quiet"], stdout=follower, stderr=follower
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = screen.read(4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert child.wait(timeout=120) == 0
    text = " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace")).split())
    assert "40/40 images" in text and "images/s" in text and "ETA 0:00:00" in text, text
    assert not any(line in text for line in ONLY_IN_THE_LOG), "bars do not pull the log back onto the terminal"
