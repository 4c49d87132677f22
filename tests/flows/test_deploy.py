"""The flow as deployments on a real Prefect server (127.0.0.1, temporary PREFECT_HOME), run with
`prefect deployment run`. Everything started here is stopped by PID."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from processes import stop_group, wait_until

from flows.prefect_server import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME; yields the environment to reach it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _healthy(env["PREFECT_API_URL"]), "the Prefect server answers", 180)
        yield env
    finally:
        stop_group(server, signal.SIGINT)


@pytest.fixture(scope="module")
def served(prefect_env: dict, tmp_path_factory: pytest.TempPathFactory):
    """`capfilt deploy` serving both deployments with the smoke preset; yields (env, run folder)."""
    out = tmp_path_factory.mktemp("run")
    log = open(out.parent / "serve.log", "w")
    process = subprocess.Popen(
        [str(BIN / "capfilt"), "deploy", "--param", f"out_dir={json.dumps(str(out))}", "--param", 'preset="smoke"'],
        env=prefect_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: _prefect(prefect_env, "deployment", "inspect", "capfilt/on-demand").returncode == 0,
            "the deployments are registered",
            180,
        )
        yield prefect_env, out
    finally:
        stop_group(process, signal.SIGINT)
        log.close()


def _prefect(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _run_deployment(env: dict, *params: str) -> subprocess.CompletedProcess:
    args = ["deployment", "run", "capfilt/on-demand", "--watch", "--watch-timeout", "1500"]
    for param in params:
        args += ["--param", param]
    return _prefect(env, *args, timeout=1600)


def _mtimes(folder: Path) -> dict[Path, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".parquet", ".safetensors")]
    return {p: p.stat().st_mtime_ns for p in files}


def test_both_deployments_are_registered_with_their_schedule(served) -> None:
    env, _ = served
    nightly = _prefect(env, "deployment", "inspect", "capfilt/nightly")
    assert nightly.returncode == 0, nightly.stderr
    assert "0 2 * * *" in nightly.stdout


def test_deployment_run_completes_and_writes_generations_and_artifact(served) -> None:
    env, out = served
    result = _run_deployment(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED" in (result.stdout + result.stderr).upper()

    generation_1 = out / "data_manifests" / "web" / "gen-0001"
    info = json.loads((generation_1 / "generation.json").read_text())
    assert info["parent_generation"] == 0 and info["flow_run_id"]
    assert set(info["counts"]["rows_by_source"]) == {"web", "synthetic", "human"}
    rows = pq.read_table(generation_1 / "samples").to_pylist()
    assert sum(r["caption_source"] == "synthetic" for r in rows) == 2 * sum(
        r["caption_source"] == "web" and r["image_ref"] is not None for r in rows
    )
    assert (generation_1 / "evaluation.json").is_file()
    report = json.loads((generation_1 / "report" / "report.json").read_text())
    assert report["counts"]["rows"] == len(rows)

    artifact = _prefect(env, "artifact", "inspect", "web-gen-1", "--output", "json")
    assert artifact.returncode == 0, artifact.stderr
    markdown = json.loads(artifact.stdout)[0]["data"]  # the latest version first
    assert "gen-0001" in markdown and "synthetic" in markdown
    assert str(generation_1 / "report" / "index.html") in markdown

    # A second run of the same deployment finds every stage's output complete: nothing is rewritten.
    before = _mtimes(out)
    again = _run_deployment(env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _mtimes(out) == before


def test_a_failing_stage_fails_the_flow_run_with_its_message(served) -> None:
    env, out = served
    result = _run_deployment(
        env,
        f"out_dir={json.dumps(str(out / 'bad'))}",
        'url_list="/nonexistent/urls.parquet"',
        'human_annotations="/x"',
        'human_image_root="/x"',
        'test_annotations="/x"',
        'test_image_root="/x"',
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "FAILED" in output.upper()
    runs = _prefect(env, "flow-run", "ls", "--state-type", "FAILED", "--output", "json")
    assert runs.returncode == 0, runs.stderr
    messages = [run["state"]["message"] or "" for run in json.loads(runs.stdout)]
    assert any("URL list not found" in message for message in messages), messages
