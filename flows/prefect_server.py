"""The Prefect server a `capfilt run` or `capfilt ablate` reports to when no PREFECT_API_URL names one.

Prefect would start a temporary server itself, as a child in the command's process group. Ctrl-C in a terminal
signals that whole group, so the server stopped first, and the flow's last reports to it (its crashed state,
its logs) retried against a dead server for up to 2.5 minutes before the command could end. The server here
runs in a session of its own: a terminal's Ctrl-C reaches only the command, which reports its end to a
server still up, then stops the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    PREFECT_UI_URL,
    get_current_settings,
    temporary_settings,
)

log = logging.getLogger(__name__)

START_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Within the block, flows report to $PREFECT_API_URL, or else to a temporary server of this command's own
    (127.0.0.1, a free port, Prefect's settings and database), which is stopped at the block's end."""
    if PREFECT_API_URL.value():
        yield
        return
    server, url = _start_server()
    try:
        # no UI URL: Prefect would log a "View at" link to a UI that this server does not serve
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api", PREFECT_UI_URL: ""}):
            yield
    finally:
        try:
            _send_pending_reports()
        finally:  # even if a second stop signal cuts the sending short
            log.info("stopping the temporary Prefect server on %s", url)
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _send_pending_reports() -> None:
    """Prefect sends a flow's logs and events in batches from threads of its own, the last ones at exit: send
    them while the server answers (else each retries, for up to minutes, against a stopped server)."""
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _start_server() -> tuple[subprocess.Popen, str]:
    """Start Prefect's API (no UI) in a new session and wait until it answers; (the process, its URL)."""
    timeout_s = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",  # Prefect's own temporary server's settings: no UI, no services
        "PREFECT__SERVER_FINAL": "1",
    }
    ending_with_parent = _ending_with_its_parent()
    for _ in range(START_ATTEMPTS):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log.info("starting a temporary Prefect server on %s", url)
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        server = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=ending_with_parent)
        if _answers(server, url, timeout_s):
            return server, url
        if server.poll() is None:
            server.kill()
            server.wait()
            raise RuntimeError(f"the temporary Prefect server on {url} did not answer within {timeout_s} s")
    raise RuntimeError(
        f"the temporary Prefect server exited at start {START_ATTEMPTS} times (code {server.returncode})"
    )


def _ending_with_its_parent() -> Callable[[], object] | None:
    """The server's preexec_fn on Linux: the kernel sends it SIGTERM when the command that started it dies,
    even by SIGKILL, so a killed command leaves no server behind in the server's own session. (prctl is looked
    up here, not in the forked child.)"""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(ctypes.CDLL(None, use_errno=True).prctl, PR_SET_PDEATHSIG, signal.SIGTERM)


def _answers(server: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Whether the server answers its health check within `timeout_s`; False at once if it exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if client.get(f"{url}/api/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
