"""Test-wide setup: offline environment, and one local Ray cluster shared by the tests that need it."""

import os

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

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, 127.0.0.1) for the whole session; shut down at the end."""
    import ray

    from pipelines.executor import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
