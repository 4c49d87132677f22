"""Filter scores for candidate captions: BLIP's ITM match probability and ITC cosine similarity.

Each image is encoded once, and its cross-attention keys/values are projected once for all its
candidates (`BlipTextEncoder`); the text side is batched across images, so a batch mixes candidates of
many images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from vlp_core.blip import BlipModel
from vlp_core.blip_encoder import BlipTextEncoder
from vlp_core.inference import inference_mode
from vlp_core.tokenizer import special_ids, tokenize


@dataclass(frozen=True)
class CaptionScores:
    """Scores of one image's candidate captions, in the order they were given.

    itm: probability that image and caption match (softmax of the ITM head, column 1), in [0, 1].
    itc: cosine similarity of the unimodal image and text features, in [-1, 1].
    """

    itm: list[float]
    itc: list[float]


def score_captions(
    model: BlipModel,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: torch.Tensor,
    captions: list[list[str]],
    batch_size: int = 64,
) -> list[CaptionScores]:
    """Score every candidate of every image: pixel_values (N, 3, H, W), captions[i] the (possibly
    empty) candidates of image i, batch_size the number of captions per text forward pass.
    Captions are truncated to model.config.max_text_length tokens."""
    _check_inputs(pixel_values, captions, batch_size)
    if len(captions) == 0:
        return []
    owners = [image for image, candidates in enumerate(captions) for _ in candidates]
    texts = [text for candidates in captions for text in candidates]
    itm_scores: list[float] = []
    itc_scores: list[float] = []
    with inference_mode(model) as device:
        image_embeds = model.encode_image(pixel_values.to(device))  # (N, 1+P, Dv), once per image
        encoder, enc_id = BlipTextEncoder(model), special_ids(tokenizer).enc
        for start in range(0, len(texts), batch_size):
            owner = torch.tensor(owners[start : start + batch_size], device=device)
            input_ids, attention_mask = tokenize(
                tokenizer, texts[start : start + batch_size], model.config.max_text_length, device
            )
            itm, itc = _score_batch(model, encoder, image_embeds, owner, input_ids, attention_mask, enc_id)
            itm_scores += itm.tolist()
            itc_scores += itc.tolist()
    return _split_per_image(captions, itm_scores, itc_scores)


def _score_batch(
    model: BlipModel,
    encoder: BlipTextEncoder,
    image_embeds: torch.Tensor,
    owner: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    enc_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match probability and ITC similarity (b,) of b captions (b, L) against their images:
    row i against image_embeds[owner[i]] (N, 1+P, Dv). The images of the batch are projected to
    cross-attention keys/values once each (an image cut by a batch boundary: once per batch)."""
    images, owner_in_batch = owner.unique(return_inverse=True)  # owners are sorted: images in caption order
    batch_images = image_embeds[images]
    text_features = model.text_features(encoder(input_ids, attention_mask))
    itc = (text_features.float() * model.image_features(batch_images)[owner_in_batch].float()).sum(dim=-1)
    itm_ids = input_ids.clone()
    itm_ids[:, 0] = enc_id  # the image-grounded encoder reads [ENC] in place of [CLS]
    hidden = encoder(itm_ids, attention_mask, encoder.image_keys_values(batch_images), owner_in_batch)
    itm = model.itm_head(hidden[:, 0]).float().softmax(dim=-1)[:, 1]
    return itm, itc


def _split_per_image(captions: list[list[str]], itm: list[float], itc: list[float]) -> list[CaptionScores]:
    """Cut the flat score lists back into one CaptionScores per image."""
    scores, start = [], 0
    for candidates in captions:
        end = start + len(candidates)
        scores.append(CaptionScores(itm=itm[start:end], itc=itc[start:end]))
        start = end
    return scores


def _check_inputs(pixel_values: torch.Tensor, captions: list[list[str]], batch_size: int) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
    if len(captions) != len(pixel_values):
        raise ValueError(f"captions must hold one list per image: {len(captions)} lists for {len(pixel_values)} images")
    for image, candidates in enumerate(captions):
        if isinstance(candidates, str) or not all(isinstance(text, str) for text in candidates):
            raise ValueError(f"captions[{image}] must be a list of strings, got {candidates!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
