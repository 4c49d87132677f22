"""Inputs the model benchmarks share: synthetic-world images and captions, and the BLIPs under test.

Models are presets with a tokenizer trained on world captions, and a vocabulary that is exactly the
tokenizer's (so no benchmark gains from ids the tokenizer cannot produce). The captioner is the tiny
preset trained here for a few hundred LM steps, so that its captions end at natural lengths as a
trained captioner's do (random weights run every caption to max_length); or a given checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pipelines.world.grammar import describe, sample_scene
from pipelines.world.render import render_scene
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import load_checkpoint
from vlp_core.config import load_preset
from vlp_core.data import image_transform
from vlp_core.inference import model_device
from vlp_core.pretrain import CAPTIONER, BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.tokenizer import special_ids, tokenize, train_tokenizer

SEED = 0
CAPTIONER_STEPS, CAPTIONER_BATCH, CAPTIONER_PAIRS, CAPTIONER_LR = 120, 32, 512, 2e-3


def world_pairs(count: int, size: int, seed: int = SEED) -> tuple[list[Image.Image], list[str]]:
    """`count` rendered scenes of the synthetic world (`size` pixels square), each with a true caption."""
    rng, pixels_rng = random.Random(seed), np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    return [render_scene(scene, size, pixels_rng) for scene in scenes], [describe(scene, rng) for scene in scenes]


def world_captions(count: int, seed: int = SEED) -> list[str]:
    """`count` true captions of random scenes (a tokenizer corpus, or candidate captions)."""
    rng = random.Random(seed)
    return [describe(sample_scene(rng), rng) for _ in range(count)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_blip(
    preset: str = "tiny", device: str | None = None, image_size: int | None = None, full_vocabulary: bool = False
) -> tuple[BlipModel, PreTrainedTokenizerBase]:
    """`preset` with random weights and a tokenizer trained on world captions (its vocabulary is the model's);
    `image_size` overrides the preset's (e.g. 384 px, the size of BLIP's released retrieval checkpoints);
    `full_vocabulary` pads the tokenizer with filler tokens to the preset's size (base: BERT's 30,524, whose LM
    head a released captioner computes at every step). The tower keeps ViT's patch stem whatever the preset
    says: the baselines run the same weights in transformers."""
    config = load_preset(preset)
    tokenizer = train_tokenizer(world_captions(2000), vocab_size=config.text.vocab_size)
    if full_vocabulary:
        tokenizer.add_tokens([f"filler{index}" for index in range(config.text.vocab_size - len(tokenizer))])
    vision = dataclasses.replace(config.vision, image_size=image_size or config.vision.image_size, stem="patch")
    config = dataclasses.replace(
        config, vision=vision, text=dataclasses.replace(config.text, vocab_size=len(tokenizer))
    )
    torch.manual_seed(SEED)
    return BlipModel(config).to(device or default_device()), tokenizer


def training_batch(
    model: BlipModel,
    tokenizer: PreTrainedTokenizerBase,
    images: list[Image.Image],
    captions: list[str],
    prompt: str = "",
) -> dict[str, torch.Tensor]:
    """The keyword arguments of `BlipPretrainer.forward` (alpha aside) for these pairs, on the model's device."""
    device = model_device(model)
    input_ids, attention_mask = tokenize(
        tokenizer, [prompt + caption for caption in captions], model.config.max_text_length, device
    )
    return {
        "pixel_values": pixel_values(model, images),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_ids": torch.arange(len(images), device=device),
    }


def train_step(pretrainer: BlipPretrainer, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One optimisation step (forward, backward, AdamW); returns the loss."""
    loss = pretrainer(**batch, alpha=pretrainer.model.config.alpha)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def captioner_under_test(
    checkpoint: Path | None = None, steps: int | None = None
) -> tuple[BlipModel, PreTrainedTokenizerBase, str]:
    """(captioner in eval mode, tokenizer, description): the checkpoint, or the tiny preset trained here
    for `steps` LM steps on world pairs, so that its captions end with [SEP] at natural lengths."""
    if checkpoint is not None:
        model, tokenizer, digest = load_checkpoint(checkpoint, default_device())
        return model.eval(), tokenizer, f"checkpoint {checkpoint} ({digest})"
    steps = CAPTIONER_STEPS if steps is None else steps
    model, tokenizer = random_blip("tiny")
    prompt = model.config.prompt
    pretrainer = BlipPretrainer(model, special_ids(tokenizer), prompt_length(tokenizer, prompt), CAPTIONER).train()
    optimizer = configure_optimizer(pretrainer, lr=CAPTIONER_LR, weight_decay=0.05)
    images, captions = world_pairs(CAPTIONER_PAIRS, model.config.vision.image_size, seed=SEED + 1)
    order = torch.randperm(CAPTIONER_PAIRS * steps, generator=torch.Generator().manual_seed(SEED)) % CAPTIONER_PAIRS
    loss = float("nan")
    for step in range(steps):
        picks = order[step * CAPTIONER_BATCH : (step + 1) * CAPTIONER_BATCH].tolist()
        loss = train_step(
            pretrainer,
            optimizer,
            training_batch(model, tokenizer, [images[i] for i in picks], [captions[i] for i in picks], prompt),
        )
    return (
        model.eval(),
        tokenizer,
        (
            f"preset tiny (vocabulary {len(tokenizer)}), LM-trained here for {steps} steps "
            f"of {CAPTIONER_BATCH} world pairs (final loss {loss:.2f})"
        ),
    )


def pixel_values(model: BlipModel, images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, S, S) normalised images on the model's device."""
    transform = image_transform(model.config, train=False)
    return torch.stack([transform(image) for image in images]).to(model_device(model))


def pixel_batch(model: BlipModel, count: int) -> torch.Tensor:
    """(count, 3, S, S) normalised world images (not seen in training) on the model's device."""
    return pixel_values(model, world_pairs(count, model.config.vision.image_size)[0])
