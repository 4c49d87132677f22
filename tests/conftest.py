"""Test-wide setup: offline environment, and one local Ray cluster shared by the tests that need it."""

import os
import shutil
import tempfile

import pytest

for name, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    # Stages run in the test process unless a test asks for Ray (pipelines.executor).
    "CAPFILT_EXECUTOR": "local",
    # One thread per process: on 2 shared cores, torch's default threading is several times slower.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(name, value)

# Local copies of remote files and folders (vlp_core.storage) go to a folder of the session's own, removed at
# its end (pytest_sessionfinish).
SESSION_CACHE = None if "CAPFILT_CACHE" in os.environ else tempfile.mkdtemp(prefix="capfilt-cache-")
if SESSION_CACHE:
    os.environ["CAPFILT_CACHE"] = SESSION_CACHE

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(1)


# `make test` runs the suite on two workers (pytest-xdist: one file per worker at a time, in this order with
# --no-loadscope-reorder). These files take 1–3.5 minutes each and go first, then the other slow ones, so that
# the two workers end together rather than one waiting on a long test that started last.
LONGEST_FIRST = (
    "tests/pipelines/test_ray_cluster.py",
    "tests/vlp_core/test_learning.py",
    "tests/flows/test_deploy.py",
    "tests/flows/test_ablate_flow.py",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item: pytest.Item) -> tuple[int, bool]:
        path = item.nodeid.split("::")[0]
        first = LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
        return first, item.get_closest_marker("slow") is None

    items.sort(key=rank)


def pytest_sessionfinish(session, exitstatus):
    if SESSION_CACHE:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, 127.0.0.1) for the whole session; shut down at the end. It declares one GPU, which
    nothing here can use (no CUDA): a test sees where Ray places the work of actors that ask for one."""
    import ray

    from pipelines.executor import init_ray

    init_ray(num_cpus=2, num_gpus=1)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_env():
    """moto's standalone S3 server on 127.0.0.1 with an empty bucket `capfilt`, for the session; yields the
    environment that points S3 clients at it (the endpoint and test credentials, as a user's environment or
    instance role would give them)."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    import s3fs
    from processes import stop_group, wait_until

    from flows.prefect_server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "moto_server"),
            "-H",
            "127.0.0.1",
            "-p",
            endpoint.rsplit(":")[-1],
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            with urllib.request.urlopen(endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:  # it answers
            return True
        except OSError:
            return False

    try:
        wait_until(answers, "the S3 server answers", 60)
        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True).mkdir(
            "capfilt"
        )
        yield env
    finally:
        stop_group(server)


@pytest.fixture
def bucket(s3_env, monkeypatch, request):
    """A folder of its own in the session's S3 bucket, with this process's environment pointing at the server."""
    from vlp_core.storage import location

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    return location(f"s3://capfilt/{request.node.name.replace('[', '-').replace(']', '')}")
