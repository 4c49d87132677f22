import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss

from vlp_core.losses import itc_loss, itm_loss, lm_loss, sample_hard_negatives


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def empty_queue(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(dim, 0), torch.zeros(dim, 0), torch.zeros(0, dtype=torch.long)


# ---- ITC -------------------------------------------------------------------------------------------


def test_itc_without_distillation_or_queue_equals_open_clip_loss():
    image, text = unit(6, 16, seed=0), unit(6, 16, seed=1)
    image_m, text_m = unit(6, 16, seed=2), unit(6, 16, seed=3)  # unused when alpha = 0
    temp = 0.07
    out = itc_loss(image, text, image_m, text_m, *empty_queue(16), torch.arange(6), temp, alpha=0.0)
    reference = ClipLoss()(image, text, logit_scale=torch.tensor(1 / temp))
    torch.testing.assert_close(out["itc_loss"], reference)
    assert out["sim_i2t"].shape == out["sim_t2i"].shape == (6, 6)


def test_itc_full_distillation_equals_cross_entropy_against_momentum_softmax():
    image, text = unit(4, 8, seed=2), unit(4, 8, seed=3)
    image_m, text_m = unit(4, 8, seed=4), unit(4, 8, seed=5)
    image_queue, text_queue = unit(8, 5, seed=6), unit(8, 5, seed=7)  # columns need not be unit here
    temp = 0.1
    out = itc_loss(
        image, text, image_m, text_m, image_queue, text_queue, torch.arange(10, 15), torch.arange(4), temp, alpha=1.0
    )

    keys_text, keys_image = torch.cat([text, text_queue.t()]), torch.cat([image, image_queue.t()])  # (B+Q, E)
    keys_text_m, keys_image_m = torch.cat([text_m, text_queue.t()]), torch.cat([image_m, image_queue.t()])
    total = 0.0
    for b in range(4):
        for query, keys, query_m, keys_m in (
            (image[b], keys_text, image_m[b], keys_text_m),
            (text[b], keys_image, text_m[b], keys_image_m),
        ):
            logits = [float(query @ k) / temp for k in keys]
            logits_m = [float(query_m @ k) / temp for k in keys_m]
            z, z_m = math.log(sum(map(math.exp, logits))), sum(map(math.exp, logits_m))
            total += -sum(math.exp(lm) / z_m * (lo - z) for lo, lm in zip(logits, logits_m))
    assert out["itc_loss"].item() == pytest.approx(total / 8, rel=1e-5)


def test_itc_counts_queued_features_of_the_same_image_as_positives():
    image, text = unit(2, 8, seed=8), unit(2, 8, seed=9)
    image_queue, text_queue = unit(8, 3, seed=10), unit(8, 3, seed=11)
    queue_ids = torch.tensor([7, 1, 9])  # column 1 is another caption/image of batch image 1
    temp = 0.2
    out = itc_loss(image, text, image, text, image_queue, text_queue, queue_ids, torch.tensor([0, 1]), temp, alpha=0.0)

    sim_i2t = image @ torch.cat([text.t(), text_queue], 1) / temp
    sim_t2i = text @ torch.cat([image.t(), image_queue], 1) / temp
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0, 0.5, 0]])
    expected = sum(-(F.log_softmax(s, 1) * targets).sum(1).mean() for s in (sim_i2t, sim_t2i)) / 2
    torch.testing.assert_close(out["itc_loss"], expected)


def test_itc_gradients_flow_to_both_online_towers_and_not_to_momentum_features():
    image, text = unit(3, 8, seed=12).requires_grad_(), unit(3, 8, seed=13).requires_grad_()
    image_m, text_m = unit(3, 8, seed=14).requires_grad_(), unit(3, 8, seed=15).requires_grad_()
    out = itc_loss(image, text, image_m, text_m, *empty_queue(8), torch.arange(3), 0.07, alpha=0.4)
    out["itc_loss"].backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert image_m.grad is None and text_m.grad is None


def test_itc_rejects_mismatched_queues():
    image = unit(2, 8, seed=0)
    with pytest.raises(ValueError, match="queues disagree"):
        itc_loss(
            image,
            image,
            image,
            image,
            torch.zeros(8, 4),
            torch.zeros(8, 4),
            torch.zeros(3, dtype=torch.long),
            torch.arange(2),
            0.07,
            0.4,
        )


# ---- ITM hard negatives ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 4), min_size=2, max_size=10).filter(lambda ids: len(set(ids)) > 1),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1.0, 30.0, 1000.0]),
)
def test_hard_negatives_never_pick_a_positive(ids, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    image_ids = torch.tensor(ids)
    n = len(ids)
    sim_i2t = torch.randn(n, n, generator=generator) * scale
    sim_t2i = torch.randn(n, n, generator=generator) * scale
    neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, image_ids, generator)
    assert neg_text.shape == neg_image.shape == (n,)
    assert (image_ids[neg_text] != image_ids).all()
    assert (image_ids[neg_image] != image_ids).all()


@pytest.mark.parametrize("hardness", [1.0, 0.5, 0.0])  # 0: uniform over the negatives
def test_hard_negatives_follow_the_masked_softmax(hardness):
    image_ids = torch.tensor([0, 0, 1, 2])  # pairs 0 and 1 are captions of the same image
    sim = torch.tensor([[5.0, 4.0, 1.0, 2.0], [0.0, 3.0, 0.5, 0.0], [1.0, 2.0, 3.0, 0.0], [0.3, 0.2, 0.1, 9.0]])
    mask = image_ids[:, None] == image_ids[None, :]
    uniform = (~mask).float() / (~mask).sum(dim=1, keepdim=True)
    expected = hardness * F.softmax(sim.masked_fill(mask, float("-inf")), dim=1) + (1 - hardness) * uniform
    generator = torch.Generator().manual_seed(0)
    draws = 2000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        neg_text, _ = sample_hard_negatives(sim, sim.t(), image_ids, generator, hardness)
        counts[torch.arange(4), neg_text] += 1
    torch.testing.assert_close(counts / draws, expected, atol=0.04, rtol=0)  # ~3.6 standard errors


def test_hard_negatives_are_reproducible_under_a_generator():
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(8)
    first = sample_hard_negatives(sim, sim.t(), ids, torch.Generator().manual_seed(42))
    second = sample_hard_negatives(sim, sim.t(), ids, torch.Generator().manual_seed(42))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_hard_negatives_refuse_a_hardness_outside_0_1():
    with pytest.raises(ValueError, match="hardness"):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), hardness=1.5)


def test_hard_negatives_need_two_distinct_images():
    with pytest.raises(ValueError, match="two distinct image_ids"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([5, 5, 5]))


def test_itm_loss_labels_positives_first():
    confident = torch.tensor([[0.0, 20.0]] * 2 + [[20.0, 0.0]] * 4)
    out = itm_loss(confident)
    assert out["itm_loss"].item() < 1e-6 and out["itm_accuracy"].item() == 1.0
    swapped = itm_loss(confident.flip(1))
    assert swapped["itm_loss"].item() == pytest.approx(20.0, rel=1e-4) and swapped["itm_accuracy"].item() == 0.0
    with pytest.raises(ValueError, match=r"\(3B, 2\)"):
        itm_loss(torch.zeros(4, 2))


def test_itm_loss_counts_both_classes_equally():
    # An undecided head (p = 0.5 everywhere) is at the loss's minimum over constant predictions:
    # the gradient on the "match" logit sums to zero although negatives outnumber positives 2 to 1.
    logits = torch.zeros(6, 2, requires_grad=True)
    itm_loss(logits)["itm_loss"].backward()
    assert logits.grad[:, 1].sum().item() == pytest.approx(0.0, abs=1e-7)
    assert logits.grad[:2, 1].sum().item() < 0 < logits.grad[2:, 1].sum().item()


# ---- LM --------------------------------------------------------------------------------------------

PROMPT_LENGTH = 3  # [DEC] + two prompt tokens


def lm_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 30, (3, 8), generator=generator)
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2, [1] * 4 + [0] * 4])
    logits = torch.randn(3, 8, 30, generator=generator)
    return logits, input_ids, attention_mask


def test_lm_loss_ignores_prompt_and_padding():
    logits, input_ids, attention_mask = lm_batch()
    reference = lm_loss(logits, input_ids, attention_mask, PROMPT_LENGTH)["lm_loss"]

    changed_ids = input_ids.clone()
    changed_ids[:, :PROMPT_LENGTH] = 1
    changed_ids[attention_mask == 0] = 0
    changed_logits = logits.clone()
    changed_logits[:, : PROMPT_LENGTH - 1] = 100.0  # these positions predict prompt tokens
    changed_logits[1, 5:] = -7.0  # these predict padding (or nothing)
    changed_logits[2, 3:] = 3.0
    changed = lm_loss(changed_logits, changed_ids, attention_mask, PROMPT_LENGTH)["lm_loss"]
    torch.testing.assert_close(changed, reference)

    caption_changed = logits.clone()
    caption_changed[0, 4] += 5.0 * F.one_hot(input_ids[0, 6], 30)
    assert lm_loss(caption_changed, input_ids, attention_mask, PROMPT_LENGTH)["lm_loss"] != reference


def test_lm_loss_label_smoothing_matches_hand_written_formula():
    logits, input_ids, attention_mask = lm_batch(seed=1)
    epsilon = 0.1
    per_token = []
    for b in range(3):
        for t in range(PROMPT_LENGTH - 1, 7):
            if attention_mask[b, t + 1]:
                log_probs = F.log_softmax(logits[b, t], dim=-1)
                target = input_ids[b, t + 1]
                per_token.append(-(1 - epsilon) * log_probs[target] - epsilon * log_probs.mean())
    expected = torch.stack(per_token).mean()
    out = lm_loss(logits, input_ids, attention_mask, PROMPT_LENGTH, label_smoothing=epsilon)
    torch.testing.assert_close(out["lm_loss"], expected)


def test_lm_loss_rejects_bad_inputs():
    logits, input_ids, attention_mask = lm_batch()
    with pytest.raises(ValueError, match="shapes disagree"):
        lm_loss(logits[:, :-1], input_ids, attention_mask, PROMPT_LENGTH)
    with pytest.raises(ValueError, match="prompt_length"):
        lm_loss(logits, input_ids, attention_mask, 0)
    with pytest.raises(ValueError, match="no caption tokens"):
        lm_loss(logits, input_ids, torch.ones_like(attention_mask).index_fill(1, torch.arange(3, 8), 0), 3)
