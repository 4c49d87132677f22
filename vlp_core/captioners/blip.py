"""capfilt's own BLIP captioner (`vlp_core.generation`): a capfilt checkpoint or a transformers
BlipForConditionalGeneration folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlp_core.captioners.base import Sampling
from vlp_core.checkpoint import CAPTIONER_NEEDS, check_checkpoint, checkpoint_config, checkpoint_digest, load_checkpoint
from vlp_core.data import PixelTransform, image_transform
from vlp_core.generation import generate
from vlp_core.inference import for_inference


class BlipCaptioner:
    backend = "blip"

    def __init__(self, checkpoint: Path, device: str | torch.device = "cpu", prompt: str | None = None) -> None:
        model, self.tokenizer, self.model_ref = load_checkpoint(checkpoint, device)
        self.model = for_inference(model)
        self.prompt = self.model.config.prompt if prompt is None else prompt
        self.transform = image_transform(self.model.config, train=False)

    @staticmethod
    def check(checkpoint: Path) -> None:
        check_checkpoint(checkpoint, CAPTIONER_NEEDS, "the caption stage")

    @staticmethod
    def load_transform(checkpoint: Path) -> PixelTransform:
        return image_transform(checkpoint_config(checkpoint), train=False)

    @staticmethod
    def digest(checkpoint: Path) -> str:
        return checkpoint_digest(checkpoint)

    def caption(self, pixels: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> list[list[str]]:
        return generate(
            self.model,
            self.tokenizer,
            pixels,
            num_captions=sampling.num_captions,
            method="nucleus",
            top_p=sampling.top_p,
            temperature=sampling.temperature,
            min_length=sampling.min_length,
            max_length=sampling.max_length,
            repetition_penalty=sampling.repetition_penalty,
            prompt=self.prompt,
            seeds=seeds,
        )
