"""Where work runs: the executor a config names, and the work that runs in this process even under Ray."""

import pytest

from pipelines.executor import resolve_executor, runs_in_process


@pytest.mark.parametrize(
    "kwargs, in_process",
    [
        (dict(executor="local", workers=4, num_gpus=1, ray_address="127.0.0.1:6379"), True),
        (dict(executor="ray"), True),  # one CPU worker: Ray would add its start-up and take away cores
        (dict(executor="ray", workers=2), False),
        (dict(executor="ray", num_gpus=0.5), False),  # Ray's CPU tasks decode beside a GPU actor
        (dict(executor="ray", ray_address="127.0.0.1:6379"), False),
    ],
)
def test_one_cpu_worker_runs_in_this_process_unless_it_joins_a_cluster(kwargs, in_process, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_in_process(**kwargs) is in_process


def test_under_ray_job_submit_one_worker_still_goes_to_the_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives its entrypoint
    assert not runs_in_process("ray")


def test_the_executor_is_the_configs_then_the_environments_then_ray(monkeypatch):
    monkeypatch.delenv("CAPFILT_EXECUTOR", raising=False)
    assert resolve_executor(None) == "ray"
    monkeypatch.setenv("CAPFILT_EXECUTOR", "local")
    assert (resolve_executor(None), resolve_executor("ray")) == ("local", "ray")
    monkeypatch.setenv("CAPFILT_EXECUTOR", "dask")
    with pytest.raises(ValueError, match=r"\$CAPFILT_EXECUTOR must be one of \('ray', 'local'\), got 'dask'"):
        resolve_executor(None)
