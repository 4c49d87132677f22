"""Helpers for tests that start real servers (Ray head, Prefect server) as process groups."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_until(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll `check` every half second; TimeoutError naming `what` if it is not true in time."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)


def stop_group(process: subprocess.Popen, first_signal: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True, and everything it started, by its PID: `first_signal`
    to the group, and once the leader has exited (or after 60 s) SIGKILL to whatever of the group is left."""
    os.killpg(process.pid, first_signal)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone
        pass
    process.wait()


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """The command line of every live process with `name`=`value` in its environment, by PID: every process a
    command starts inherits the command's environment, whether it runs in the command's session or in its own."""
    marker = f"{name}={value}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # not a process, or it has just ended
            continue
    return found
