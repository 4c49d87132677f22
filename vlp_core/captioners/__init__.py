"""Captioner backends by name: capfilt's own BLIP (the default), transformers' BLIP-2, InstructBLIP and
LLaVA, and open_clip's CoCa. Each loads from a local folder and samples the same way (`base.Sampling`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp_core.captioners.base import Captioner, Sampling
from vlp_core.captioners.blip import BlipCaptioner
from vlp_core.captioners.coca import CocaCaptioner
from vlp_core.captioners.vlm import KINDS, VlmCaptioner
from vlp_core.data import PixelTransform
from vlp_core.storage import Location, local_copy, location

__all__ = [
    "BACKENDS",
    "Captioner",
    "Sampling",
    "captioner_digest",
    "captioner_transform",
    "check_captioner",
    "load_captioner",
]


@dataclass(frozen=True)
class Backend:
    load: Callable[..., Captioner]  # (folder, device=, prompt=) -> a loaded captioner
    check: Callable[[Path], None]  # folder -> None, or CheckpointError saying what is wrong
    digest: Callable[[Path], str]  # folder -> the digest of its weights, without loading them
    transform: Callable[[Path], PixelTransform]  # folder -> its image transform, without loading the model


_BACKENDS = {
    "blip": Backend(BlipCaptioner, BlipCaptioner.check, BlipCaptioner.digest, BlipCaptioner.load_transform),
    **{
        name: Backend(
            functools.partial(VlmCaptioner, kind),
            functools.partial(VlmCaptioner.check_folder, kind),
            VlmCaptioner.digest,
            VlmCaptioner.load_transform,
        )
        for name, kind in KINDS.items()
    },
    "coca": Backend(CocaCaptioner, CocaCaptioner.check, CocaCaptioner.digest, CocaCaptioner.load_transform),
}
BACKENDS = tuple(_BACKENDS)


def _backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown captioner backend {name!r}; known: {', '.join(BACKENDS)}")
    return _BACKENDS[name]


def check_captioner(backend: str, checkpoint: str | Location) -> None:
    """Everything that can be checked before loading: the backend's name and its folder's layout
    (ValueError / CheckpointError saying what to fix). A remote folder is checked on its local copy."""
    checks, folder = _backend(backend).check, location(checkpoint)
    if not folder.is_dir():
        raise ValueError(f"checkpoint {checkpoint} is not a model folder")
    checks(local_copy(folder))


def captioner_digest(backend: str, checkpoint: str | Location) -> str:
    """The digest a captioner records with its captions (`model_ref`), without loading it."""
    return _backend(backend).digest(local_copy(location(checkpoint)))


def captioner_transform(backend: str, checkpoint: str | Location) -> PixelTransform:
    """How the `backend` model in `checkpoint` reads an image, without loading the model (for decode workers)."""
    return _backend(backend).transform(local_copy(location(checkpoint)))


def load_captioner(
    backend: str, checkpoint: str | Location, device: str | torch.device = "cpu", prompt: str | None = None
) -> Captioner:
    """The `backend` model in `checkpoint` (local or remote) on `device`; `prompt` None takes the backend's
    default."""
    return _backend(backend).load(local_copy(location(checkpoint)), device=device, prompt=prompt)
