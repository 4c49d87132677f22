"""capfilt on a Ray cluster of two nodes with its data in an S3 bucket, all on 127.0.0.1: a head started with
`ray start --head` (no CPUs: it schedules, as on a real cluster, and runs no work), a second node joined with
`ray start --address` (the CPUs, and a label), and moto's standalone S3 server (`s3_env`, tests/conftest.py).
Stages join through RAY_ADDRESS or run as `ray job submit` jobs. Everything is stopped by PID."""

import contextlib
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

import pyarrow.compute as pc
import pytest
import s3fs
from processes import stop_group, wait_until
from released_models import released_filter

from flows.prefect_server import free_port
from pipelines.manifests.manifest import Generation
from vlp_core.clip import load_clip, save_clip
from vlp_core.storage import Location, location, upload_folder

BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(16)
BUCKET = "capfilt"
WORKER_LABEL = "capfilt-test=worker"
pytestmark = pytest.mark.slow


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # it answers (Ray's token auth may say 401): it is up
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster_env(s3_env, tmp_path_factory):
    """What every node and client of the cluster runs with: token authentication with this module's own token,
    stages on Ray, the bucket's environment, and a cache of local copies of its own."""
    return {
        **os.environ,
        **s3_env,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "CAPFILT_EXECUTOR": "ray",
        "CAPFILT_CACHE": str(tmp_path_factory.mktemp("cache")),
    }


def _start_node(env: dict[str, str], log: Path, *options: str) -> subprocess.Popen:
    """`ray start --block` with its own ports, in its own process group, its output to `log`."""
    agent_ports = (
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    )
    with log.open("wb") as output:
        return subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                *options,
                *agent_ports,
                "--disable-usage-stats",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"


def _join_worker(env: dict[str, str], gcs_port: int, dashboard: str, temp_dir: Path) -> subprocess.Popen:
    """Start the labelled second node and wait until the head lists it. A node that exits or has not joined in
    90 s is started once more (its ports were free when taken, but another process may have won one since);
    if that one fails too, the error carries both nodes' output and the raylet logs."""
    for attempt in (1, 2):
        log = temp_dir / f"worker-{attempt}.log"
        options = (f"--address=127.0.0.1:{gcs_port}", "--num-cpus=3", f"--labels={WORKER_LABEL}")
        worker = _start_node(env, log, *options)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda node=worker: node.poll() is not None or _worker_node(dashboard) is not None, "a join", 90)
        if worker.poll() is None and _worker_node(dashboard) is not None:
            return worker
        stop_group(worker, signal.SIGINT)
    listing = subprocess.run(
        [str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--detail"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    raylet_logs = sorted((temp_dir / "session_latest" / "logs").glob("raylet*.out"))
    raise TimeoutError(
        "the second node did not join the head in two tries of 90 s\n"
        + f"--- ray list nodes:\n{listing.stdout[-3000:]}{listing.stderr[-3000:]}\n"
        + "\n".join(f"--- {path.name}:\n{_tail(path)}" for path in [*temp_dir.glob("worker-*.log"), *raylet_logs])
    )


@pytest.fixture(scope="module")
def ray_head(cluster_env):
    """The two-node cluster: (gcs address, dashboard/job address) of its head."""
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    head = _start_node(
        cluster_env,
        temp_dir / "head.log",
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--num-cpus=0",
        f"--temp-dir={temp_dir}",
    )
    worker = None
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: _answers(f"{dashboard}/api/version"), "the Ray dashboard answers", 120)
        worker = _join_worker(cluster_env, gcs_port, dashboard, temp_dir)
        yield f"127.0.0.1:{gcs_port}", dashboard
    finally:
        for node in (worker, head):  # a node exits in seconds on SIGINT, ~30 s on SIGTERM
            if node is not None:
                stop_group(node, signal.SIGINT)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_list(dashboard: str, what: str, env: dict[str, str]) -> list[dict]:
    """`ray list actors|nodes --detail` of the cluster, as JSON records."""
    command = [
        str(BIN / "ray"),
        "list",
        what,
        "--address",
        dashboard,
        "--detail",
        "--format",
        "json",
        "--limit",
        "10000",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.startswith("[") else []  # or "No resource"


def _worker_node(dashboard: str) -> str | None:
    """The node id of the labelled second node, once it is up."""
    key, value = WORKER_LABEL.split("=")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    nodes = [
        n
        for n in _ray_list(dashboard, "nodes", env)
        if n["state"] == "ALIVE" and (n.get("labels") or {}).get(key) == value
    ]
    return nodes[0]["node_id"] if nodes else None


PROBE = (
    "import json, ray; from pipelines.executor import init_ray; init_ray(); "
    "print(json.dumps({'cpus': ray.cluster_resources().get('CPU'), 'address': ray.get_runtime_context().gcs_address}))"
)


def test_init_ray_joins_the_cluster_named_by_ray_address(ray_head, cluster_env) -> None:
    gcs_address, _ = ray_head
    env = {**cluster_env, "RAY_ADDRESS": gcs_address}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["cpus"] == 3.0, "joined the cluster (3 logical CPUs, on its second node), not a fresh local Ray"
    assert probe["address"].rsplit(":", 1)[1] == gcs_address.rsplit(":", 1)[1]


def _submit_job(dashboard: str, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    """`ray job submit` and wait for the job; retried while the head's job agent is still starting."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", *command]
    for _ in range(60):
        out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr:
            return out
        time.sleep(2)
    return out


def test_ray_job_submit_round_trip(ray_head, cluster_env) -> None:
    _, dashboard = ray_head
    out = _submit_job(dashboard, cluster_env, sys.executable, "-c", PROBE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"cpus": 3.0' in out.stdout
    assert "succeeded" in out.stdout + out.stderr


def _capfilt_run(out: str, models: Location, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start `capfilt run --preset smoke` with a given filter and CLIP ranker (in `models`): it fine-tunes the
    captioner and pretrains on each generation."""
    given = ["--filter-checkpoint", str(models / "filter"), "--clip-checkpoint", str(models / "clip.safetensors")]
    command = [str(BIN / "capfilt"), "run", "--preset", "smoke", "--n-web", "20", "--out", out, *given]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(run: subprocess.Popen) -> str:
    """The run's standard error, once it has succeeded."""
    stdout, stderr = run.communicate(timeout=1200)
    assert run.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stderr


def _rows(generation: Generation, run_folder: str) -> list[dict]:
    """A generation's rows by sample id, with what names the run's place left out: image paths relative to
    the run folder, and no URL (the world's server listens on another port in each run)."""
    rows = generation.read_samples().sort_by("sample_id").drop_columns(["url"]).to_pylist()
    for row in rows:
        row["image_ref"] = (row["image_ref"] or "").replace(run_folder, "RUN")
    return rows


def test_a_run_in_a_bucket_spreads_over_two_nodes_and_equals_the_run_on_local_paths(
    ray_head, cluster_env, s3_env, tmp_path: Path, monkeypatch
) -> None:
    """`capfilt run --out s3://...` through RAY_ADDRESS, its given models in the bucket too: its manifests,
    shards, checkpoints and log are only in the bucket, its training workers and caption / filter actors ran
    on the second node (Ray's actor records), and its generations equal the same run's on local paths, in this
    process. Then `capfilt caption` runs as a Ray job on that bucket's manifests."""
    gcs_address, dashboard = ray_head
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    models, remote_models = tmp_path / "models", location(f"s3://{BUCKET}/models")
    released_filter(models / "filter")
    save_clip(load_clip("clip_tiny"), models / "clip.safetensors")
    upload_folder(models, remote_models)

    run, here = f"s3://{BUCKET}/run", tmp_path / "cwd"
    here.mkdir()
    env = {**cluster_env, "RAY_ADDRESS": gcs_address, "PREFECT_HOME": str(tmp_path / "prefect")}
    on_cluster = _capfilt_run(run, remote_models, env, here)
    local_env = {**cluster_env, "CAPFILT_EXECUTOR": "local", "PREFECT_HOME": str(tmp_path / "prefect-local")}
    _finished(_capfilt_run(str(tmp_path / "local"), models, local_env, tmp_path))  # meanwhile, beside it
    stderr = _finished(on_cluster)
    assert not any(here.iterdir()), "nothing of the run is written where it was started"

    stored = s3fs.S3FileSystem(skip_instance_cache=True).find(f"{BUCKET}/run")
    for expected in ("web/gen-0000/shards/00000.tar", "web/gen-0001/samples/part-00000.parquet",
                     "web/gen-0001/report/index.html", "final/model.safetensors", "checkpoints/step-"):  # fmt: skip
        assert any(expected in key for key in stored), f"no {expected} in the bucket"
    log = location(f"{run}/capfilt.log").read_text()
    for library_line in ("Connected to Ray cluster", "Starting execution of Dataset", "Sharding file number"):
        assert library_line in log and library_line not in stderr, "Ray and img2dataset write to the log"

    worker = _worker_node(dashboard)
    actors = _ray_list(dashboard, "actors", cluster_env)
    for work in ("RayTrainWorker", "MapBatches(CaptionActor))", "MapBatches(FilterActor))"):  # decoding fused in
        nodes = {actor["node_id"] for actor in actors if actor["class_name"].endswith(work)}
        assert nodes == {worker}, f"{work} ran on {nodes}, not only on the second node {worker}"

    for number in (0, 1):
        remote = Generation(location(f"{run}/data_manifests"), "web", number)
        local = Generation(tmp_path / "local" / "data_manifests", "web", number)
        assert _rows(remote, run) == _rows(local, str(tmp_path / "local")), f"generation {number} differs"
        assert remote.read_info()["checkpoints"] == local.read_info()["checkpoints"]
        remote_metrics = json.loads((remote.path / "evaluation.json").read_text())
        assert remote_metrics["retrieval"] == json.loads((local.path / "evaluation.json").read_text())["retrieval"]

    captioner = next(key for key in stored if "/train/captioner-" in key and key.endswith("final/config.json"))
    caption = ["capfilt", "caption", "--root", f"{run}/data_manifests", "--generation", "2", "--num-captions", "2",
               "--checkpoint", f"s3://{captioner.removesuffix('/config.json')}"]  # fmt: skip
    job = _submit_job(dashboard, cluster_env, str(BIN / caption[0]), *caption[1:])
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    captions = Generation(location(f"{run}/data_manifests"), "web", 2).read_samples()
    synthetic = captions.filter(pc.equal(captions["caption_source"], "synthetic"))
    web_images = pc.count_distinct(captions.filter(pc.is_valid(captions["image_ref"]))["image_id"]).as_py()
    assert web_images >= 17 and synthetic.num_rows == 2 * web_images
