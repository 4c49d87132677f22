"""CPU learning test: a tiny BLIP pretrained from scratch on the synthetic world's human set learns it.

Held-out checks: ITC text->image retrieval (R@1 of 100 images); an ITM head that tells a caption of the
image from a caption of another image and, less surely, from the same caption with a wrong attribute;
greedy captions that parse under the world grammar, get most attributes right and are truer of their own
image than of another.
"""

import math
import random

import pytest
import torch

from pipelines.world.generate import WorldConfig, load_scenes, make_world
from pipelines.world.grammar import attribute_accuracy, parse_caption, wrong_attribute_caption
from vlp_core.blip import BlipModel
from vlp_core.config import load_preset
from vlp_core.data import image_transform, load_coco_karpathy, load_image
from vlp_core.generation import generate
from vlp_core.momentum import alpha_ramp
from vlp_core.pretrain import BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.tokenizer import special_ids, tokenize, train_tokenizer

# ---- hyper-parameters (all of them) -----------------------------------------------------------------
WORLD = WorldConfig(seed=0, n_web=20, n_human=400, n_test=100)
# From scratch, image and text features start out nearly identical and the contrastive signal is tiny;
# the LM loss's early gradient on the shared text layers drowns it. So the encoders first learn with
# ITC alone (BLIP instead starts from pretrained encoders), then all three objectives train together,
# with ITM negatives going from uniform to ITC-hard (hard ones alone keep the ITM head at its prior).
PHASES = ((("itc",), 300), (("itc", "itm", "lm"), 250))  # (objectives, steps)
BATCH_SIZE, LR, WARMUP = 32, 5e-4, 20
MAX_TOKENS = 40
# Margins below the measured values with the tiny preset (conv stem, 48 px: a 3×3 grid of image tokens):
# text->image R@1 0.71; 0.79 ranked above a wrong-attribute caption; greedy captions' attribute accuracy 0.62
# on the own image vs 0.32 on another (with the 64 px preset before: 0.57, 0.75, 0.58 vs 0.33). The recipe
# is deterministic on CPU under its seeds; the slack covers other CPUs' floating-point differences.
RETRIEVAL_AT_1 = 0.6
RANKED_ABOVE_WRONG_ATTRIBUTE = 0.72
CAPTION_ACCURACY = 0.55
CAPTION_ACCURACY_OVER_ANOTHER_IMAGE = 0.2


def load_split(annotations, root, transform):
    records = load_coco_karpathy(annotations, root)
    return records, torch.stack([transform(load_image(record.image_path)) for record in records])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    paths = make_world(tmp_path_factory.mktemp("world"), WORLD)
    config = load_preset("tiny")  # its queue (one batch) and momentum (0.99) are set for short runs from scratch
    transform = image_transform(config, train=False)
    human, human_pixels = load_split(paths.human_annotations, paths.human_root, transform)
    test, test_pixels = load_split(paths.test_annotations, paths.test_root, transform)
    tokenizer = train_tokenizer([config.prompt + c for record in human for c in record.captions], vocab_size=256)

    model = BlipModel(config)
    pairs = [(i, caption) for i, record in enumerate(human) for caption in record.captions]
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for objectives, steps in PHASES:
        pretrainer = BlipPretrainer(
            model, special_ids(tokenizer), prompt_length(tokenizer, config.prompt), objectives
        ).train()
        optimizer = configure_optimizer(pretrainer, lr=LR, weight_decay=0.05)
        for step in range(steps):
            batch = rng.sample(pairs, BATCH_SIZE)
            image_index = torch.tensor([i for i, _ in batch])
            input_ids, attention_mask = tokenize(tokenizer, [config.prompt + c for _, c in batch], MAX_TOKENS)
            for group in optimizer.param_groups:  # linear warm-up, cosine decay
                group["lr"] = LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
            out = pretrainer(
                human_pixels[image_index],
                input_ids,
                attention_mask,
                image_index,
                alpha=alpha_ramp(step, steps // 2, config.alpha),
                generator=generator,
                hardness=step / steps,
            )
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        print(objectives, {name: round(value.item(), 3) for name, value in out.items()})
    return model.eval(), tokenizer, test, test_pixels, load_scenes(paths)


@pytest.mark.slow
def test_itc_retrieves_held_out_images(trained):
    model, tokenizer, test, test_pixels, _ = trained
    captions = [(i, c) for i, record in enumerate(test) for c in record.captions]
    input_ids, attention_mask = tokenize(tokenizer, [c for _, c in captions], MAX_TOKENS)
    with torch.no_grad():
        image_features = model.image_features(model.encode_image(test_pixels))
        text_features = model.text_features(model.encode_text(input_ids, attention_mask))
    truth = torch.tensor([i for i, _ in captions])
    recall_at_1 = ((text_features @ image_features.t()).argmax(dim=1) == truth).float().mean().item()
    print(f"text->image R@1 {recall_at_1:.3f} (chance {1 / len(test):.3f})")
    assert recall_at_1 >= RETRIEVAL_AT_1


def match_probability(model, tokenizer, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """(N,) ITM match probability of image i with caption i."""
    input_ids, attention_mask = tokenize(tokenizer, captions, MAX_TOKENS)
    input_ids[:, 0] = special_ids(tokenizer).enc
    with torch.no_grad():
        return model.itm_logits(model.encode_image(pixels), input_ids, attention_mask).softmax(dim=1)[:, 1]


@pytest.mark.slow
def test_itm_tells_the_image_s_caption_from_another_image_s(trained):
    model, tokenizer, test, test_pixels, _ = trained
    captions = [record.captions[0] for record in test]
    own = match_probability(model, tokenizer, test_pixels, captions)
    other = match_probability(model, tokenizer, test_pixels, captions[1:] + captions[:1])  # the next image's
    ranked = (own > other).float().mean().item()
    accuracy = ((own > 0.5).float().mean() + (other <= 0.5).float().mean()).item() / 2
    print(
        f"ITM: mean match probability {own.mean():.3f} for the image's caption, {other.mean():.3f} for "
        f"another's; own above other for {ranked:.3f} of images; balanced accuracy at 0.5 {accuracy:.3f}"
    )
    assert ranked >= 0.8 and accuracy >= 0.65


@pytest.mark.slow
def test_itm_prefers_the_image_s_caption_to_one_with_a_wrong_attribute(trained):
    model, tokenizer, test, test_pixels, scenes = trained
    rng = random.Random(1)
    captions = [record.captions[0] for record in test]
    wrong = [wrong_attribute_caption(scenes[record.image_id], rng) for record in test]  # 1-2 attributes changed
    own = match_probability(model, tokenizer, test_pixels, captions)
    altered = match_probability(model, tokenizer, test_pixels, wrong)
    ranked = (own > altered).float().mean().item()
    print(
        f"ITM: mean match probability {own.mean():.3f} for the image's caption, {altered.mean():.3f} with a "
        f"wrong attribute; own above for {ranked:.3f} of images"
    )
    assert ranked >= RANKED_ABOVE_WRONG_ATTRIBUTE


@pytest.mark.slow
def test_greedy_captions_parse_and_are_truer_of_their_own_image(trained):
    model, tokenizer, test, test_pixels, scenes = trained
    captions = [c for [c] in generate(model, tokenizer, test_pixels, method="greedy", min_length=3, max_length=25)]
    parsed = sum(parse_caption(c) is not None for c in captions) / len(captions)
    own = sum(attribute_accuracy(c, scenes[r.image_id]) for c, r in zip(captions, test)) / len(test)
    shifted = test[1:] + test[:1]  # every caption judged against another image's scene
    other = sum(attribute_accuracy(c, scenes[r.image_id]) for c, r in zip(captions, shifted)) / len(test)
    print(f"parsed {parsed:.2f}, attribute accuracy {own:.3f} on own image vs {other:.3f} on another")
    assert parsed >= 0.9
    assert own >= CAPTION_ACCURACY and own >= other + CAPTION_ACCURACY_OVER_ANOTHER_IMAGE
