"""Every tensor lands on the device of the data it meets: generation, scoring, training steps and the CLIP
ranker under the CPU guard (tests/device_guard.py, the model on the CPU), and the same calls on a real
GPU where there is one."""

import copy

import pytest
import torch
from device_guard import tensors_made_without_a_device_are_meta

from vlp_core.clip import load_clip
from vlp_core.config import VISION_STEMS
from vlp_core.generation import generate
from vlp_core.inference import for_inference
from vlp_core.pretrain import CAPTIONER, FILTER, PRETRAIN, BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.scoring import score_captions
from vlp_core.tokenizer import special_ids, tokenize

CAPTIONS = [["a red circle", "a blue square to the left of a circle"], ["a green triangle"], []]
PROMPT = "a picture of "


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    return word_tokenizer([PROMPT, *(caption for captions in CAPTIONS for caption in captions)])


@pytest.fixture(scope="module")
def model(tokenizer, small_blip):
    return small_blip(tokenizer)


def pixels(device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)


GENERATION_CASES = {
    "nucleus with seeds": {"method": "nucleus", "num_captions": 3, "seeds": [1, 2, 3]},
    "nucleus with a generator": {"method": "nucleus", "num_captions": 3, "generator": "cpu"},
    "greedy": {"method": "greedy"},
    "beam": {"method": "beam", "num_beams": 3, "num_captions": 2},
}


def generation_kwargs(case: str, device: str | torch.device) -> dict:
    kwargs = dict(GENERATION_CASES[case], min_length=1, max_length=6, prompt=PROMPT)
    if kwargs.get("generator"):
        kwargs["generator"] = torch.Generator(device=device).manual_seed(0)
    return kwargs


def training_batch(tokenizer, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    captions = [PROMPT + caption for captions in CAPTIONS for caption in captions]
    input_ids, attention_mask = tokenize(tokenizer, captions, 16, device=device)
    images = torch.randn(len(captions), 3, 32, 32, device=device)
    return images, input_ids, attention_mask, torch.arange(len(captions), device=device)


def pretraining_step(
    model, tokenizer, objectives: tuple[str, ...], device: str | torch.device
) -> tuple[dict, torch.optim.Optimizer]:
    """Build the trainee where the model is (its queues too), run one step with ITM negatives and AdamW."""
    trainee = BlipPretrainer(model, special_ids(tokenizer), prompt_length(tokenizer, PROMPT), objectives).train()
    optimizer = configure_optimizer(trainee, lr=1e-3, weight_decay=0.05)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = trainee(*training_batch(tokenizer, device), alpha=0.4, generator=generator)
    losses["loss"].backward()
    optimizer.step()
    trainee(*training_batch(tokenizer, device), alpha=0.4, generator=generator)  # the queues hold features now
    return losses, optimizer


# --------------------------------------------------------------------------- the guard, on the CPU


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_generation_makes_no_tensor_off_the_models_device(model, tokenizer, case):
    images = pixels()
    expected = generate(model, tokenizer, images, **generation_kwargs(case, "cpu"))
    kwargs = generation_kwargs(case, "cpu")
    with tensors_made_without_a_device_are_meta():
        captions = generate(model, tokenizer, images, **kwargs)
    assert captions == expected


def test_a_conv_stem_model_generates_and_scores_without_a_tensor_off_its_device(tokenizer, small_blip):
    model, images = small_blip(tokenizer, stem="conv"), pixels()
    expected = generate(model, tokenizer, images, **generation_kwargs("nucleus with seeds", "cpu"))
    expected_scores = score_captions(model, tokenizer, images, CAPTIONS, batch_size=2)
    with tensors_made_without_a_device_are_meta():
        captions = generate(model, tokenizer, images, **generation_kwargs("nucleus with seeds", "cpu"))
        scores = score_captions(model, tokenizer, images, CAPTIONS, batch_size=2)
    assert captions == expected and scores == expected_scores


def test_scoring_makes_no_tensor_off_the_models_device(model, tokenizer):
    images = pixels()
    expected = score_captions(model, tokenizer, images, CAPTIONS, batch_size=2)
    with tensors_made_without_a_device_are_meta():
        scores = score_captions(model, tokenizer, images, CAPTIONS, batch_size=2)
    assert scores == expected


@pytest.mark.parametrize("stem", VISION_STEMS)
@pytest.mark.parametrize("objectives", [PRETRAIN, CAPTIONER, FILTER])
def test_a_training_step_makes_no_tensor_off_the_models_device(tokenizer, small_blip, objectives, stem):
    model = small_blip(tokenizer, stem=stem)
    with tensors_made_without_a_device_are_meta():
        losses, optimizer = pretraining_step(model, tokenizer, objectives, "cpu")
    assert all(torch.isfinite(value).all() for value in losses.values())
    assert optimizer.defaults["fused"] is None, "the CPU keeps PyTorch's AdamW"


def test_bf16_weights_under_autocast_caption_and_score_as_float32_ones(tokenizer, small_blip):
    """What the caption and filter actors run on a GPU (`for_inference`), here under the CPU's bf16 autocast."""
    model = small_blip(tokenizer).eval()
    expected_captions = generate(model, tokenizer, pixels(), **generation_kwargs("greedy", "cpu"))
    expected_scores = score_captions(model, tokenizer, pixels(), CAPTIONS)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for case in GENERATION_CASES:
            captions = generate(bf16, tokenizer, pixels(), **generation_kwargs(case, "cpu"))
            assert [len(image_captions) for image_captions in captions] == [
                GENERATION_CASES[case].get("num_captions", 1)
            ] * len(CAPTIONS)
        assert generate(bf16, tokenizer, pixels(), **generation_kwargs("greedy", "cpu")) == expected_captions
        scores = score_captions(bf16, tokenizer, pixels(), CAPTIONS)
    for ours, reference in zip(scores, expected_scores, strict=True):
        assert ours.itm == pytest.approx(reference.itm, abs=0.02) and ours.itc == pytest.approx(reference.itc, abs=0.02)


def test_clip_ranker_makes_no_tensor_off_the_models_device():
    torch.manual_seed(0)
    ranker = load_clip("clip_tiny")
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = ranker.scores(ranker.image_features(images), CAPTIONS)
    with tensors_made_without_a_device_are_meta():
        scores = ranker.scores(ranker.image_features(images), CAPTIONS)
        loss = ranker.contrastive_loss(images[:2], ["a red circle", "a green triangle"])
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.isfinite(loss["contrastive_loss"])


# --------------------------------------------------------------------------- the same calls on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("case", GENERATION_CASES)
def test_generation_on_cuda(tokenizer, small_blip, case):
    model = small_blip(tokenizer).cuda()
    captions = generate(model, tokenizer, pixels("cuda"), **generation_kwargs(case, "cuda"))
    per_image = GENERATION_CASES[case].get("num_captions", 1)
    assert [len(row) for row in captions] == [per_image] * len(CAPTIONS)


@cuda
def test_the_inference_copy_is_bf16_on_cuda_and_float32_elsewhere(tokenizer, small_blip):
    assert next(for_inference(small_blip(tokenizer)).parameters()).dtype == torch.float32
    on_cuda = for_inference(small_blip(tokenizer).cuda())
    assert next(on_cuda.parameters()).dtype == torch.bfloat16 and not on_cuda.training
    captions = generate(on_cuda, tokenizer, pixels("cuda"), **generation_kwargs("nucleus with seeds", "cuda"))
    assert all(len(image_captions) == 3 for image_captions in captions)
    assert all(0 <= value <= 1 for scores in score_captions(on_cuda, tokenizer, pixels("cuda"), CAPTIONS)
               for value in scores.itm)  # fmt: skip


@cuda
def test_scoring_on_cuda(tokenizer, small_blip):
    expected = score_captions(small_blip(tokenizer), tokenizer, pixels(), CAPTIONS)
    scores = score_captions(small_blip(tokenizer).cuda(), tokenizer, pixels("cuda"), CAPTIONS)
    for got, want in zip(scores, expected, strict=True):
        assert got.itm == pytest.approx(want.itm, abs=0.05) and got.itc == pytest.approx(want.itc, abs=0.05)


@cuda
@pytest.mark.parametrize("stem", VISION_STEMS)
@pytest.mark.parametrize("objectives", [PRETRAIN, CAPTIONER, FILTER])
def test_a_training_step_on_cuda(tokenizer, small_blip, objectives, stem):
    losses, optimizer = pretraining_step(small_blip(tokenizer, stem=stem).cuda(), tokenizer, objectives, "cuda")
    assert optimizer.defaults["fused"] is True
    assert all(value.device.type == "cuda" and torch.isfinite(value).all() for value in losses.values())


@cuda
def test_the_vit_encodes_on_cuda_as_on_the_cpu(tokenizer, small_blip):
    model = small_blip(tokenizer).eval()
    images = pixels("cpu")
    with torch.no_grad():
        expected = model.encode_image(images)
        on_cuda = model.cuda().encode_image(images.cuda())  # fused attention there
    torch.testing.assert_close(on_cuda.cpu(), expected, atol=1e-4, rtol=1e-4)


@cuda
def test_clip_ranker_on_cuda():
    ranker = load_clip("clip_tiny", device="cuda")
    images = torch.randn(len(CAPTIONS), 3, 64, 64, device="cuda")
    scores = ranker.scores(ranker.image_features(images), CAPTIONS)
    assert [len(s) for s in scores] == [len(c) for c in CAPTIONS]
    assert torch.isfinite(ranker.contrastive_loss(images[:2], ["a red circle", "a green triangle"])["contrastive_loss"])
