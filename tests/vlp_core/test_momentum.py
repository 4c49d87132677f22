import copy

import pytest
import torch
from torch import nn

from vlp_core.momentum import FeatureQueue, alpha_ramp, ema_update


def test_ema_update_is_exact():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    momentum = copy.deepcopy(online)
    for p in momentum.parameters():
        p.data.normal_()
    before = {n: p.clone() for n, p in momentum.named_parameters()}
    ema_update(online, momentum, 0.9)
    for name, p in online.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p
        torch.testing.assert_close(dict(momentum.named_parameters())[name], expected, rtol=0, atol=1e-15)


def test_ema_update_with_m_one_keeps_momentum_and_zero_copies_online():
    online, momentum = nn.Linear(3, 3), nn.Linear(3, 3)
    frozen = momentum.weight.clone()
    ema_update(online, momentum, 1.0)
    assert torch.equal(momentum.weight, frozen)
    ema_update(online, momentum, 0.0)
    assert torch.equal(momentum.weight, online.weight)


def test_ema_update_rejects_different_modules():
    with pytest.raises(ValueError, match="parameter names differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_queue_fills_then_wraps_around():
    queue = FeatureQueue(dim=2, size=5, device=torch.device("cpu"))
    assert queue.features.shape == (2, 0) and queue.ids.shape == (0,)
    queue.enqueue(torch.tensor([[0.0, 0], [1, 1], [2, 2]]), torch.tensor([0, 1, 2]))
    assert queue.ids.tolist() == [0, 1, 2]
    queue.enqueue(torch.tensor([[3.0, 3], [4, 4], [5, 5]]), torch.tensor([3, 4, 5]))
    # 5 overwrote the oldest entry (0); column j always holds id j's features
    assert queue.ids.tolist() == [5, 1, 2, 3, 4]
    assert queue.features[0].tolist() == [5.0, 1, 2, 3, 4]
    queue.enqueue(torch.arange(14.0).view(7, 2), torch.arange(10, 17))  # more than the queue
    assert sorted(queue.ids.tolist()) == [12, 13, 14, 15, 16]
    torch.testing.assert_close(queue.features[:, queue.ids.argsort()], torch.arange(4.0, 14).view(5, 2).t())


def test_queue_state_round_trips_through_state_dict():
    queue = FeatureQueue(dim=3, size=4, device=torch.device("cpu"))
    queue.enqueue(torch.randn(3, 3), torch.tensor([7, 8, 9]))
    restored = FeatureQueue(dim=3, size=4, device=torch.device("cpu"))
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features, queue.features) and restored.ids.tolist() == [7, 8, 9]
    restored.enqueue(torch.zeros(2, 3), torch.tensor([1, 2]))
    assert restored.ids.tolist() == [2, 8, 9, 1]


def test_queue_rejects_wrong_shapes():
    queue = FeatureQueue(dim=3, size=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"features \(B, 3\)"):
        queue.enqueue(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))


def test_alpha_ramp():
    assert alpha_ramp(0, 100, 0.4) == 0.0
    assert alpha_ramp(50, 100, 0.4) == pytest.approx(0.2)
    assert alpha_ramp(100, 100, 0.4) == alpha_ramp(1000, 100, 0.4) == pytest.approx(0.4)
