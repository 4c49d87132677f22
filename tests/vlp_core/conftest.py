"""Shared fixtures of the vlp_core tests: a small, randomly initialised BLIP that looks at its images."""

import dataclasses
from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from vlp_core.blip import BlipModel
from vlp_core.config import load_preset

SMALL_IMAGE_SIZE = 32


def build_small_blip(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> BlipModel:
    """The tiny preset cut to 2 layers, 32 px images and the tokenizer's vocabulary, in eval mode.

    An untrained model barely looks at the image, so the cross-attention values (shared by the
    image-grounded encoder and the decoder) are scaled up: scores and captions then depend on the image.
    """
    torch.manual_seed(seed)
    tiny = load_preset("tiny")
    config = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, image_size=SMALL_IMAGE_SIZE, num_layers=2),
        text=dataclasses.replace(tiny.text, vocab_size=len(tokenizer), num_layers=2),
    )
    model = BlipModel(config).eval()
    with torch.no_grad():
        for layer in model.text_encoder.encoder.layer:
            layer.crossattention.self.value.weight.mul_(30.0)
    return model


@pytest.fixture(scope="session")
def small_blip() -> Callable[..., BlipModel]:
    """`build_small_blip(tokenizer, seed=0)`, for test modules (which cannot import conftest)."""
    return build_small_blip
