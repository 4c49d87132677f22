"""What every captioner backend is: K captions per image, seeded per image, with one meaning of the
sampling settings.

Every backend samples with the same nucleus rule (`vlp_core.generation.nucleus_sample`) and the same
per-image draws (`row_draws` with one seed per image), so `top_p`, `temperature`, the lengths and the
repetition penalty mean the same thing whichever model writes the captions, and an image's captions do
not depend on the batch it is in. Lengths count caption tokens after the prompt: at least `min_length`
before the end token, at most `max_length` with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from vlp_core.data import PixelTransform


@dataclass(frozen=True)
class Sampling:
    """Nucleus sampling settings (BLIP's CapFilt: top_p 0.9, 10 captions per image)."""

    num_captions: int = 10  # K captions per image
    top_p: float = 0.9
    temperature: float = 1.0
    min_length: int = 5  # caption tokens before the end token
    max_length: int = 30  # caption tokens, the end token included
    repetition_penalty: float = 1.0

    def problems(self) -> list[tuple[bool, str]]:
        """(ok, message) pairs, one per rule a setting must follow."""
        return [
            (self.num_captions >= 1, f"num_captions must be >= 1, got {self.num_captions}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.temperature > 0.0, f"temperature must be > 0, got {self.temperature}"),
            (self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
            (
                0 <= self.min_length <= self.max_length,
                f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}",
            ),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]


class Captioner(Protocol):
    """A loaded captioning model. Shapes: N images of S x S pixels."""

    backend: str  # its name in `vlp_core.captioners.BACKENDS`
    model_ref: str  # digest of its weights, recorded with every caption it writes
    prompt: str | None  # the text the model is given before the caption (None: none)
    transform: PixelTransform  # what `load_transform(folder)` gives, without the model

    def caption(self, pixels: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> list[list[str]]:
        """(N, 3, S, S) images and one seed per image -> N lists of `sampling.num_captions` captions."""
