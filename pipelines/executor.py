"""Where stages run their work: on Ray (an existing cluster, `RAY_ADDRESS` or `--ray-address`, or a local
one) or in this process.

- "ray": Ray Data actor pools (caption, filter, rank), Ray Train workers (training) and Ray tasks
  (evaluation). The engine for clusters, several workers or GPUs, and restarts after a worker failure.
- "local": the same actors, training loop and tasks, called in this process one after the other: no
  Ray start-up (~25 s per Ray Train run). For tests and small single-machine runs.

A config's `executor` chooses; None means `$CAPFILT_EXECUTOR`, else "ray". Under "ray", work that Ray would
only slow down runs in this process too (`runs_in_process`).
"""

from __future__ import annotations

import os

from pipelines.stopping import keep_sigterm_handler

EXECUTORS = ("ray", "local")
EXECUTOR_ENV = "CAPFILT_EXECUTOR"


def resolve_executor(executor: str | None) -> str:
    """`executor`, else $CAPFILT_EXECUTOR, else "ray"; ValueError for anything but EXECUTORS."""
    value = executor or os.environ.get(EXECUTOR_ENV) or "ray"
    if value not in EXECUTORS:
        source = "executor" if executor else f"${EXECUTOR_ENV}"
        raise ValueError(f"{source} must be one of {EXECUTORS}, got {value!r}")
    return value


def joins_cluster(ray_address: str | None) -> bool:
    """Whether Ray work goes to a cluster: an address is given, or `$RAY_ADDRESS` names one."""
    return ray_address is not None or "RAY_ADDRESS" in os.environ


def runs_in_process(executor: str, *, workers: int = 1, num_gpus: float = 0.0, ray_address: str | None = None) -> bool:
    """Whether a stage's model work (inference actors, evaluation tasks) runs in this process: with the local
    executor, and under Ray when Ray would add only its start-up: one worker, on the CPU, no cluster to join
    (a Ray worker would also get one core, where this process has all of them). GPU actors stay on Ray, whose
    CPU tasks decode images beside them."""
    return executor == "local" or (workers == 1 and not num_gpus and not joins_cluster(ray_address))


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at `address` (or `$RAY_ADDRESS`); without one, start a local Ray on 127.0.0.1.

    Idempotent: a process already connected keeps its connection (a `ray job submit` entrypoint is).
    """
    import ray  # only the Ray executor pays for importing Ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        options = {"address": address, "log_to_driver": True}
    else:
        options = {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
        }
    keep_sigterm_handler(lambda: ray.init(**options))
