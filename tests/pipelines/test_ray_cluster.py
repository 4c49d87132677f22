"""Stages against an existing Ray cluster: a head started with `ray start --head` on 127.0.0.1,
joined through RAY_ADDRESS, and a stage run as a `ray job submit` job. Everything is stopped by PID."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from processes import free_port, stop_group, wait_until

BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(16)
pytestmark = pytest.mark.slow


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # it answers (Ray's token auth may say 401): it is up
        return True
    except OSError:
        return False


def _cluster_env() -> dict[str, str]:
    """Token authentication on, with this module's own token (head and clients share it)."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 in its own process group: (gcs address, dashboard/job address)."""
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = _cluster_env()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=3",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: _answers(f"{dashboard}/api/version"), "the Ray dashboard answers", 120)
        yield f"127.0.0.1:{gcs_port}", dashboard
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


PROBE = (
    "import json, ray; from pipelines.ray_runtime import init_ray; init_ray(); "
    "print(json.dumps({'cpus': ray.cluster_resources().get('CPU'), 'address': ray.get_runtime_context().gcs_address}))"
)


def test_init_ray_joins_the_cluster_named_by_ray_address(ray_head) -> None:
    gcs_address, _ = ray_head
    env = {**_cluster_env(), "RAY_ADDRESS": gcs_address}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["cpus"] == 3.0, "joined the head (3 logical CPUs), not a fresh local Ray"
    assert probe["address"].rsplit(":", 1)[1] == gcs_address.rsplit(":", 1)[1]


def test_ray_job_submit_round_trip(ray_head) -> None:
    _, dashboard = ray_head
    submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", sys.executable, "-c", PROBE]
    for _ in range(30):  # the job agent starts a little after the dashboard answers
        out = subprocess.run(submit, env=_cluster_env(), capture_output=True, text=True, timeout=300)
        if "No available agent" not in out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"cpus": 3.0' in out.stdout
    assert "succeeded" in out.stdout + out.stderr
