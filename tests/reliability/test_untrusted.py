"""Untrusted files cannot run code, and the servers the project starts are reachable from this host only."""

import os
import pickle
import socket

import pytest
import torch

from pipelines.training.loop import STATE_FILE, load_training_state
from pipelines.world.generate import WorldConfig, make_world
from pipelines.world.server import WorldServer


class _RunsShellOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_training_state_carrying_code_is_refused_without_running_it(tmp_path) -> None:
    """Resume state is loaded with weights_only=True: an object that would run a command on unpickling
    is refused, and the command does not run."""
    marker = tmp_path / "pwned"
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    torch.save({"step": 2, "history": [], "payload": _RunsShellOnUnpickle(marker)}, step / STATE_FILE)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_training_state(step, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    assert not marker.exists()


def _outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_world_server_is_not_reachable_on_the_hosts_other_addresses(tmp_path) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    world = make_world(tmp_path / "world", WorldConfig(seed=0, n_web=2, n_human=1, n_test=1))
    with WorldServer(world.root) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5)
