"""Stages against an existing Ray cluster: a head started with `ray start --head` on 127.0.0.1,
joined through RAY_ADDRESS, and a stage run as a `ray job submit` job. Everything is stopped by PID."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from processes import free_port, stop_group, wait_until

from flows.cli import main
from pipelines.manifests.manifest import Generation

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
    """Token authentication on, with this module's own token (head and clients share it); stages on Ray."""
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "CAPFILT_EXECUTOR": "ray",
    }


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 in its own process group: (gcs address, dashboard/job address)."""
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = _cluster_env()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=3",
            # Own ports for the head's agents: the defaults may be taken by another Ray on this machine.
            *(
                f"--{flag}={free_port()}"
                for flag in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                )
            ),
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: _answers(f"{dashboard}/api/version"), "the Ray dashboard answers", 120)
        yield f"127.0.0.1:{gcs_port}", dashboard
    finally:
        stop_group(head, signal.SIGINT)  # the head exits in seconds on SIGINT, ~30 s on SIGTERM
        shutil.rmtree(temp_dir, ignore_errors=True)


PROBE = (
    "import json, ray; from pipelines.executor import init_ray; init_ray(); "
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


def _submit_job(dashboard: str, *command: str) -> subprocess.CompletedProcess:
    """`ray job submit` and wait for the job; retried while the head's job agent is still starting."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", *command]
    for _ in range(60):
        out = subprocess.run(submit, env=_cluster_env(), capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr:
            return out
        time.sleep(2)
    return out


def test_ray_job_submit_round_trip(ray_head) -> None:
    _, dashboard = ray_head
    out = _submit_job(dashboard, sys.executable, "-c", PROBE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"cpus": 3.0' in out.stdout
    assert "succeeded" in out.stdout + out.stderr


def test_stage_commands_run_on_the_cluster(ray_head, tmp_path: Path) -> None:
    """`capfilt finetune` joins the cluster through RAY_ADDRESS; `capfilt caption` runs as a Ray job."""
    gcs_address, dashboard = ray_head
    world, root, run_dir = tmp_path / "world", tmp_path / "manifests", tmp_path / "captioner"
    capfilt = str(BIN / "capfilt")
    assert main(["world", "--out", str(world), "--n-web", "20", "--n-human", "8", "--n-test", "4"]) == 0
    assert main(["download", "--world", str(world), "--root", str(root)]) == 0

    finetune = subprocess.run(
        [
            capfilt,
            "finetune",
            "captioner",
            "--preset",
            "tiny",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--annotations",
            str(world / "human" / "annotations.json"),
            "--image-root",
            str(world / "human"),
            "--run-dir",
            str(run_dir),
        ],
        env={**_cluster_env(), "RAY_ADDRESS": gcs_address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finetune.returncode == 0, finetune.stderr[-3000:]

    caption = [
        capfilt,
        "caption",
        "--root",
        str(root),
        "--generation",
        "1",
        "--checkpoint",
        str(run_dir / "final"),
        "--num-captions",
        "2",
        "--batch-size",
        "4",
    ]
    job = _submit_job(dashboard, *caption)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]

    rows = Generation(root, "web", 1).read_samples().to_pylist()
    images = {r["image_id"] for r in rows if r["caption_source"] == "web" and r["image_ref"]}
    synthetic = [r for r in rows if r["caption_source"] == "synthetic"]
    assert len(images) >= 17 and len(synthetic) == 2 * len(images)
    assert {r["image_id"] for r in synthetic} == images
