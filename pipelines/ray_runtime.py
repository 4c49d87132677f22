"""Connecting stages to Ray: an existing cluster (`RAY_ADDRESS` or `--ray-address`) or a local one."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or `$RAY_ADDRESS`); without one, start a local Ray on 127.0.0.1.

    Idempotent: a process already connected keeps its connection (a `ray job submit` entrypoint is).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
