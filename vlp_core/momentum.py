"""Momentum distillation helpers: the EMA update, the ITC feature queue and the alpha warm-up."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def ema_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """In place, for every parameter pair: ``p_m <- m * p_m + (1 - m) * p``.

    Both modules must have the same parameter names and shapes (``momentum`` is a copy of ``online``).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    online_params = dict(online.named_parameters())
    momentum_params = dict(momentum.named_parameters())
    if online_params.keys() != momentum_params.keys():
        raise ValueError(
            "momentum module is not a copy of the online module: parameter names differ "
            f"({sorted(online_params.keys() ^ momentum_params.keys())[:5]} ...)"
        )
    for name, p in online_params.items():
        momentum_params[name].mul_(m).add_(p.detach(), alpha=1.0 - m)


def alpha_ramp(step: int, steps_per_epoch: int, alpha: float) -> float:
    """BLIP's distillation warm-up: ``alpha * min(1, step / steps_per_epoch)`` (full after one epoch)."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return alpha * min(1.0, step / steps_per_epoch)


def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) over data-parallel ranks along dim 0 (no grad); identity when
    not distributed. BLIP enqueues the features of the whole global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


class FeatureQueue(nn.Module):
    """Ring buffer of the most recent ``size`` features (E, Q) and their image ids (Q,).

    State lives in buffers, so it moves with ``.to(device)`` and is saved in ``state_dict``.
    Until the buffer is full, only the filled columns are returned.
    """

    def __init__(self, dim: int, size: int, device: torch.device) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"queue dim and size must be positive, got dim={dim}, size={size}")
        self.register_buffer("_features", torch.zeros(dim, size, device=device))
        self.register_buffer("_ids", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("_count", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self._features.shape[1]

    @property
    def features(self) -> torch.Tensor:
        """(E, count) queued features (a detached clone, safe to use while enqueueing)."""
        return self._features[:, : int(self._count)].clone()

    @property
    def ids(self) -> torch.Tensor:
        """(count,) image ids aligned with ``features`` columns."""
        return self._ids[: int(self._count)].clone()

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        """Append ``features`` (B, E) and ``ids`` (B,), overwriting the oldest entries when full."""
        if features.ndim != 2 or features.shape[1] != self._features.shape[0] or ids.shape != features.shape[:1]:
            raise ValueError(
                f"enqueue expects features (B, {self._features.shape[0]}) and ids (B,), "
                f"got {tuple(features.shape)} and {tuple(ids.shape)}"
            )
        features, ids = features[-self.size :], ids[-self.size :]  # more than the queue: keep the newest
        slots = (int(self._ptr) + torch.arange(features.shape[0], device=self._features.device)) % self.size
        self._features[:, slots] = features.detach().to(self._features.dtype).t()
        self._ids[slots] = ids.to(self._ids.dtype)
        self._ptr.fill_((int(self._ptr) + features.shape[0]) % self.size)
        self._count.fill_(min(self.size, int(self._count) + features.shape[0]))
