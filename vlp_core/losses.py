"""BLIP's three pretraining objectives as pure functions of tensors.

Each loss returns a named dict (open_clip style) so that callers can log every term:

- ``itc_loss``: image-text contrastive loss with momentum distillation and a feature queue.
- ``sample_hard_negatives`` + ``itm_loss``: image-text matching on ITC-mined hard negatives.
- ``lm_loss``: image-grounded captioning loss (next-token cross-entropy with label smoothing).

Shapes: B batch, E projection width, Q queue length, L text length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); both (B, N)."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_features_m: torch.Tensor,
    text_features_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    queue_ids: torch.Tensor,
    image_ids: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Image-text contrastive loss with momentum distillation (BLIP's ITA).

    Each online feature is contrasted against the other modality's online features of the batch
    followed by the queue. Every column showing the same ``image_id`` as the row is a positive (several
    captions of one image are all correct). The targets mix the momentum model's own similarity
    distribution (momentum batch + queue) with the ground truth:
    ``alpha * softmax(sim_m) + (1 - alpha) * positives / num_positives``.

    One deliberate departure from BLIP's code: there the in-batch columns are momentum features too.
    BLIP starts from pretrained encoders; from scratch, momentum keys are near-identical for hundreds
    of steps and give the online encoders almost no gradient. Online in-batch columns (as in CLIP)
    let both towers learn from the first step; the queue and the soft targets stay as in BLIP.

    Args:
        image_features, text_features: (B, E) L2-normalised online features.
        image_features_m, text_features_m: (B, E) L2-normalised momentum features (no grad).
        image_queue, text_queue: (E, Q) momentum features of earlier batches (Q may be 0).
        queue_ids: (Q,) image ids of the queued features.
        image_ids: (B,) image id of each pair in the batch.
        temp: softmax temperature (scalar), expected already clamped to [0.001, 0.5].
        alpha: distillation weight in [0, 1].

    Returns:
        ``itc_loss`` (scalar) and the detached in-batch similarities ``sim_i2t``, ``sim_t2i``
        (B, B) of the online features, from which ITM mines its hard negatives.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image_queue.shape != text_queue.shape or image_queue.shape[1] != queue_ids.shape[0]:
        raise ValueError(
            "queues disagree: image_queue, text_queue must both be (E, Q) and queue_ids (Q,), got "
            f"{tuple(image_queue.shape)}, {tuple(text_queue.shape)}, {tuple(queue_ids.shape)}"
        )
    batch_size = image_features.shape[0]
    all_ids = torch.cat([image_ids, queue_ids])
    positives = (image_ids[:, None] == all_ids[None, :]).float()
    ground_truth = positives / positives.sum(dim=1, keepdim=True)

    with torch.autocast(image_features.device.type, enabled=False):  # similarities in float32
        image_queue, text_queue = image_queue.float(), text_queue.float()
        with torch.no_grad():
            image_m, text_m = image_features_m.float(), text_features_m.float()
            sim_i2t_m = image_m @ torch.cat([text_m.t(), text_queue], dim=1) / temp  # (B, B+Q)
            sim_t2i_m = text_m @ torch.cat([image_m.t(), image_queue], dim=1) / temp
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * ground_truth
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * ground_truth

        image, text = image_features.float(), text_features.float()
        sim_i2t = image @ torch.cat([text.t(), text_queue], dim=1) / temp  # (B, B+Q)
        sim_t2i = text @ torch.cat([image.t(), image_queue], dim=1) / temp
        loss = (_soft_cross_entropy(sim_i2t, targets_i2t) + _soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return {
        "itc_loss": loss,
        "sim_i2t": sim_i2t[:, :batch_size].detach(),
        "sim_t2i": sim_t2i[:, :batch_size].detach(),
    }


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    hardness: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    BLIP draws each negative with probability softmax(sim) over the batch, renormalised after masking
    out every positive (same ``image_id``), so captions of the same image are never negatives. Here the
    draw follows ``hardness * softmax(sim) + (1 - hardness) * uniform`` over the negatives: ``hardness``
    1 is BLIP's sampling, 0 draws uniformly. From scratch, an ITM head fed only hard negatives stays at
    the class prior (their pairs are too alike to tell apart before cross-attention has learnt
    anything), so training ramps the hardness up from 0.

    Args:
        sim_i2t, sim_t2i: (B, B) similarities (logits); row b scores pair b against all columns.
        image_ids: (B,) image id of each pair.
        generator: makes the draw reproducible; sampling runs on the generator's device.
        hardness: in [0, 1], the share of the draw that follows the similarities.

    Returns:
        ``(neg_text_index, neg_image_index)``, both (B,) long: the text index to pair with image b,
        and the image index to pair with text b.
    """
    if not 0.0 <= hardness <= 1.0:
        raise ValueError(f"hardness must be in [0, 1], got {hardness}")
    positives = image_ids[:, None] == image_ids[None, :]
    if positives.all(dim=1).any():
        raise ValueError(
            "cannot mine ITM negatives: some pair shares its image_id with the whole batch; "
            "a batch needs at least two distinct image_ids (shuffle, or use a larger batch)"
        )

    def draw(sim: torch.Tensor) -> torch.Tensor:
        # Masking in logit space keeps the distribution exact even when softmax would underflow.
        hard = F.softmax(sim.detach().float().masked_fill(positives, float("-inf")), dim=1)
        uniform = (~positives).float() / (~positives).sum(dim=1, keepdim=True)
        weights = hardness * hard + (1 - hardness) * uniform
        if generator is not None:
            weights = weights.to(generator.device)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(sim.device)

    return draw(sim_i2t), draw(sim_t2i)


def itm_loss(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class-balanced cross-entropy of the ITM head on B positives followed by 2B negatives.

    A departure from BLIP, whose plain cross-entropy makes 1/3 the head's prior for "match": a head that
    has not finished learning then puts most true pairs below the filter's 0.5. Weighting the positives
    twice makes the two classes count equally, so a match probability of 0.5 means "as likely a match as
    not", whatever the training's share of negatives.

    Args:
        logits: (3B, 2); rows [0, B) are matched pairs, rows [B, 3B) the mined negatives (column 1
            is "match").

    Returns:
        ``itm_loss`` (scalar) and ``itm_accuracy`` (scalar, detached) for logging.
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] % 3 != 0:
        raise ValueError(f"ITM logits must be (3B, 2): B positives then 2B negatives, got {tuple(logits.shape)}")
    batch_size = logits.shape[0] // 3
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    class_weights = torch.tensor([1.0, 2.0], device=logits.device)  # 2B negatives, B positives
    return {
        "itm_loss": F.cross_entropy(logits.float(), labels, weight=class_weights),
        "itm_accuracy": (logits.detach().argmax(dim=1) == labels).float().mean(),
    }


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    label_smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy of the captioning decoder, averaged over caption tokens.

    Position t predicts token t+1. Targets inside the first ``prompt_length`` tokens (``[DEC]`` and
    the prompt "a picture of ") and padding (``attention_mask == 0``) are excluded, so the model
    learns the caption, not the fixed prompt.

    Args:
        logits: (B, L, V) decoder outputs for ``input_ids``.
        input_ids: (B, L) ids starting with ``[DEC]``.
        attention_mask: (B, L), 1 for real tokens, 0 for padding.
        prompt_length: number of leading tokens that are never targets (>= 1).
        label_smoothing: as in ``F.cross_entropy`` (BLIP uses 0.1).

    Returns:
        ``lm_loss`` (scalar).
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)} must be (B, L, V) for input_ids "
            f"{tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)}"
        )
    if not 1 <= prompt_length < input_ids.shape[1]:
        raise ValueError(f"prompt_length must be in [1, L={input_ids.shape[1]}), got {prompt_length}")
    targets = input_ids.masked_fill(attention_mask == 0, -100)
    targets[:, :prompt_length] = -100
    if (targets[:, 1:] == -100).all():
        raise ValueError("no caption tokens to learn from: every target is prompt or padding")
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets[:, 1:].flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
    return {"lm_loss": loss}
