"""The temporary Prefect server of `capfilt run` and `capfilt ablate` (`flows.prefect_server.prefect_api`): it
answers inside the block from a session of its own, and is gone after the block, or once the command is
killed; a PREFECT_API_URL that is set is used as it is."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL, temporary_settings
from processes import processes_with_env, wait_until

from flows.prefect_server import prefect_api

COMMAND = """
import sys, time, httpx
from prefect import flow
from prefect.settings import PREFECT_API_URL
from flows.prefect_server import prefect_api
with prefect_api():
    url = PREFECT_API_URL.value()
    print(url, httpx.get(f"{url}/health").status_code, flush=True)
    if sys.argv[1] == "flow":
        flow(name="hello")(lambda: None)()
    if sys.argv[1] == "stay":
        time.sleep(600)
"""


def _command(home: Path, then: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-c", COMMAND, then],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _servers(home: Path) -> dict[int, str]:
    return {pid: line for pid, line in processes_with_env("PREFECT_HOME", str(home)).items() if "uvicorn" in line}


def test_the_server_answers_inside_the_block_and_is_gone_after_it(tmp_path: Path) -> None:
    command = _command(tmp_path, "end")
    url, status = command.stdout.readline().split()
    assert command.wait(timeout=60) == 0
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and status == "200"
    assert not _servers(tmp_path)


def test_a_flow_run_reports_to_it_without_a_link_to_a_ui_it_does_not_serve(tmp_path: Path) -> None:
    command = _command(tmp_path, "flow")
    _, stderr = command.communicate(timeout=120)
    assert command.returncode == 0, stderr
    assert "Beginning flow run" in stderr and "Finished in state Completed()" in stderr
    assert "View at" not in stderr


def test_a_killed_command_leaves_no_server_behind(tmp_path: Path) -> None:
    command = _command(tmp_path, "stay")
    try:
        assert command.stdout.readline().split()[1] == "200"
        (server,) = _servers(tmp_path)
        assert os.getsid(server) != os.getsid(command.pid), "the server is out of reach of the terminal's Ctrl-C"
        command.send_signal(signal.SIGKILL)
        command.wait(timeout=30)
        wait_until(lambda: not _servers(tmp_path), "the server ends with the command that started it", 30)
    finally:
        command.kill()  # nothing once it has ended
        for pid in _servers(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_given_prefect_api_url_is_used_as_it_is() -> None:
    given = "http://prefect.example:4200/api"
    with temporary_settings(updates={PREFECT_API_URL: given}), prefect_api():
        assert PREFECT_API_URL.value() == given
