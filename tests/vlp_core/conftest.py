"""Shared fixtures of the vlp_core tests: a small, randomly initialised BLIP that looks at its images, and
a word-level tokenizer with a fixed vocabulary (a trained WordPiece vocabulary orders tied pieces
differently from one process to the next, and the model's behaviour would change with it)."""

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from vlp_core.blip import BlipModel
from vlp_core.config import load_preset
from vlp_core.tokenizer import BERT_SPECIAL_TOKENS, load_tokenizer

SMALL_IMAGE_SIZE = 32


def build_small_blip(tokenizer: PreTrainedTokenizerBase, seed: int = 0, stem: str = "patch") -> BlipModel:
    """The tiny preset cut to 2 layers, 32 px images in 8 px patches, the tokenizer's vocabulary and text init 0.02,
    in eval mode; ViT's patch stem unless told (so that it converts to transformers' layout).

    An untrained model barely looks at the image, so the cross-attention values (shared by the
    image-grounded encoder and the decoder) are scaled up: scores and captions then depend on the image.
    """
    torch.manual_seed(seed)
    tiny = load_preset("tiny")
    config = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, image_size=SMALL_IMAGE_SIZE, patch_size=8, num_layers=2, stem=stem),
        text=dataclasses.replace(tiny.text, vocab_size=len(tokenizer), num_layers=2, initializer_range=0.02),
    )
    model = BlipModel(config).eval()
    with torch.no_grad():
        for layer in model.text_encoder.encoder.layer:
            layer.crossattention.self.value.weight.mul_(30.0)
    return model


@pytest.fixture(scope="session")
def small_blip() -> Callable[..., BlipModel]:
    """`build_small_blip(tokenizer, seed=0, stem="patch")`, for test modules (which cannot import conftest)."""
    return build_small_blip


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Iterable[str]], PreTrainedTokenizerBase]:
    """`make(texts)`: a BLIP tokenizer whose vocabulary is the special tokens, then every word of `texts`
    in sorted order; the same on every run."""

    def make(texts: Iterable[str]) -> PreTrainedTokenizerBase:
        folder = tmp_path_factory.mktemp("word_tokenizer")
        words = sorted({word for text in texts for word in text.lower().split()})
        Path(folder, "vocab.txt").write_text("\n".join([*BERT_SPECIAL_TOKENS, *words]) + "\n")
        return load_tokenizer(folder)

    return make
