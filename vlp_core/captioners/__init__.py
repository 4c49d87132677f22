"""Captioner backends by name: capfilt's own BLIP (the default), transformers' BLIP-2, InstructBLIP and
LLaVA, and open_clip's CoCa. Each loads from a local folder and samples the same way (`base.Sampling`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from vlp_core.captioners.base import Captioner, Sampling
from vlp_core.captioners.blip import BlipCaptioner
from vlp_core.captioners.coca import CocaCaptioner
from vlp_core.captioners.vlm import KINDS, VlmCaptioner

__all__ = ["BACKENDS", "Captioner", "Sampling", "check_captioner", "load_captioner"]

_LOADERS: dict[str, Callable[..., Captioner]] = {
    "blip": BlipCaptioner,
    **{name: functools.partial(VlmCaptioner, kind) for name, kind in KINDS.items()},
    "coca": CocaCaptioner,
}
_CHECKS: dict[str, Callable[[Path], None]] = {
    "blip": BlipCaptioner.check,
    **{name: functools.partial(VlmCaptioner.check_folder, kind) for name, kind in KINDS.items()},
    "coca": CocaCaptioner.check,
}
BACKENDS = tuple(_LOADERS)


def _known(backend: str) -> None:
    if backend not in _LOADERS:
        raise ValueError(f"unknown captioner backend {backend!r}; known: {', '.join(BACKENDS)}")


def check_captioner(backend: str, checkpoint: str | Path) -> None:
    """Everything that can be checked before loading: the backend's name and its folder's layout
    (ValueError / CheckpointError saying what to fix)."""
    _known(backend)
    if not Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint {checkpoint} is not a model folder")
    _CHECKS[backend](Path(checkpoint))


def load_captioner(
    backend: str, checkpoint: str | Path, device: str | torch.device = "cpu", prompt: str | None = None
) -> Captioner:
    """The `backend` model in `checkpoint` on `device`; `prompt` None takes the backend's default."""
    _known(backend)
    return _LOADERS[backend](Path(checkpoint), device=device, prompt=prompt)
