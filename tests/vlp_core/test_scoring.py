"""Tests for vlp_core.scoring: batched ITM/ITC scores equal the naive per-pair computation."""

import pytest
import torch

from vlp_core.blip_encoder import BlipTextEncoder
from vlp_core.scoring import CaptionScores, score_captions
from vlp_core.tokenizer import special_ids, tokenize

CAPTIONS = [
    ["a red circle", "a large blue square to the left of a small green triangle", "the"],
    [],
    ["a small green triangle"],
    ["a blue circle", "a red square to the right of a circle"],
]


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    return word_tokenizer(caption for candidates in CAPTIONS for caption in candidates)


@pytest.fixture(scope="module")
def model(tokenizer, small_blip):
    return small_blip(tokenizer)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(0))


def naive_scores(model, tokenizer, image: torch.Tensor, caption: str) -> tuple[float, float]:
    """ITM probability and ITC similarity of one (image, caption) pair, computed on its own."""
    with torch.no_grad():
        image_embeds = model.encode_image(image[None])
        input_ids, attention_mask = tokenize(tokenizer, [caption], model.config.max_text_length)
        itc = model.text_features(model.encode_text(input_ids, attention_mask)) @ model.image_features(image_embeds).T
        input_ids[:, 0] = special_ids(tokenizer).enc
        itm = model.itm_logits(image_embeds, input_ids, attention_mask).softmax(dim=-1)[0, 1]
    return itm.item(), itc.item()


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_scores_equal_naive_per_pair_scores(model, tokenizer, pixels, batch_size):
    scores = score_captions(model, tokenizer, pixels, CAPTIONS, batch_size=batch_size)
    assert [len(s.itm) for s in scores] == [len(s.itc) for s in scores] == [len(c) for c in CAPTIONS]
    for image, (candidates, image_scores) in enumerate(zip(CAPTIONS, scores)):
        for caption, itm, itc in zip(candidates, image_scores.itm, image_scores.itc):
            expected_itm, expected_itc = naive_scores(model, tokenizer, pixels[image], caption)
            assert itm == pytest.approx(expected_itm, abs=1e-5)
            assert itc == pytest.approx(expected_itc, abs=1e-5)
    assert scores[1] == CaptionScores(itm=[], itc=[])


def test_scores_depend_on_the_pairing(model, tokenizer, pixels):
    scores = score_captions(model, tokenizer, pixels, CAPTIONS)
    flat_itm = [value for s in scores for value in s.itm]
    assert all(0.0 <= value <= 1.0 for value in flat_itm)
    assert all(-1.0 <= value <= 1.0 for s in scores for value in s.itc)
    assert max(flat_itm) - min(flat_itm) > 0.05
    swapped = score_captions(model, tokenizer, pixels[[2, 1, 0, 3]], CAPTIONS)
    assert swapped[0].itm != pytest.approx(scores[0].itm, abs=1e-4)  # the same captions on another image


def test_each_image_is_encoded_exactly_once(model, tokenizer, pixels):
    vision_batches = []
    hook = model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        score_captions(model, tokenizer, pixels, CAPTIONS, batch_size=2)
    finally:
        hook.remove()
    assert vision_batches == [len(CAPTIONS)]


def test_empty_inputs(model, tokenizer, pixels):
    assert score_captions(model, tokenizer, pixels[:0], []) == []
    assert score_captions(model, tokenizer, pixels[:2], [[], []]) == [CaptionScores([], []), CaptionScores([], [])]


@pytest.mark.parametrize(
    "captions,batch_size,message",
    [
        ([["a"]], 8, "one list per image: 1 lists for 4 images"),
        (["a", "b", "c", "d"], 8, r"captions\[0\] must be a list of strings"),
        ([["a"], [3], [], []], 8, r"captions\[1\] must be a list of strings"),
        ([[], [], [], []], 0, "batch_size must be >= 1"),
    ],
)
def test_bad_inputs_are_explained(model, tokenizer, pixels, captions, batch_size, message):
    with pytest.raises(ValueError, match=message):
        score_captions(model, tokenizer, pixels, captions, batch_size=batch_size)


def test_cross_attention_keys_values_are_projected_once_per_image(model, tokenizer, pixels, monkeypatch):
    projected = []
    original = BlipTextEncoder.image_keys_values
    monkeypatch.setattr(
        BlipTextEncoder,
        "image_keys_values",
        lambda self, image_embeds: projected.append(len(image_embeds)) or original(self, image_embeds),
    )
    score_captions(model, tokenizer, pixels, CAPTIONS, batch_size=64)
    assert projected == [3]  # one batch holds every caption; image 1 has none
    projected.clear()
    score_captions(model, tokenizer, pixels, CAPTIONS, batch_size=2)
    assert projected == [1, 2, 1]  # owners per batch: [0 0] [0 2] [3 3]; image 0 is cut by a batch boundary
