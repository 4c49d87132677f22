"""Where stages run their work: on Ray (an existing cluster, `RAY_ADDRESS` or `--ray-address`, or a local
one) or in this process.

- "ray": Ray Data actor pools (caption, filter, rank), Ray Train workers (training) and Ray tasks
  (evaluation). The engine for clusters, several workers or GPUs, and restarts after a worker failure.
- "local": the same actors, training loop and tasks, called in this process one after the other: no
  Ray start-up (~25 s per Ray Train run). For tests and small single-machine runs.

A config's `executor` chooses; None means `$CAPFILT_EXECUTOR`, else "ray".
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
