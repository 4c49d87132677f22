"""BLIP's text encoder run over whole captions for scoring, with cross-attention keys/values per image.

`BlipTextEncoder` reads the weights of `model.text_encoder` and calls them as functions (the arithmetic of
`BlipTextModel`, attention through `scaled_dot_product_attention`). It runs both passes the filter needs:

- unimodal (no image): the [CLS] feature for ITC;
- image-grounded: every layer's cross-attention attends to its image's keys and values, which
  `image_keys_values` projects once per image. transformers projects them again for every caption;
  with K candidates per image this is K times the work, and at real image sizes (197 to 577 patches
  against ~20 caption tokens) it is the largest part of a caption's cost.

Shapes: B captions, L tokens, n images, P patches, D text width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp_core.bert_blocks import (
    add_norm,
    cross_keys_values,
    embed,
    feed_forward,
    linear,
    merge_heads,
    project_heads,
    split_heads,
)
from vlp_core.blip import BlipModel

ImageKeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: cross-attention keys, values (n, H, 1+P, D/H)


class BlipTextEncoder:
    """BLIP's text encoder on the weights of `model.text_encoder` (no copies), for inference."""

    def __init__(self, model: BlipModel):
        self.embeddings = model.text_encoder.embeddings
        self.layers = list(model.text_encoder.encoder.layer)
        self.num_heads = model.config.text.num_heads

    def image_keys_values(self, image_embeds: torch.Tensor) -> ImageKeysValues:
        """(n, 1+P, Dv) image embeddings -> every layer's cross-attention keys and values of each image."""
        return [cross_keys_values(layer, image_embeds, self.num_heads) for layer in self.layers]

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: ImageKeysValues | None = None,
        owner: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, D) hidden states. Unimodal when `images` is None; else image-grounded,
        caption i attending to image owner[i] of `images` (from `image_keys_values`)."""
        if (images is None) != (owner is None):
            raise ValueError("pass images and owner together (image-grounded) or neither (unimodal)")
        hidden = embed(self.embeddings, input_ids)
        padding = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys that may be attended
        for index, layer in enumerate(self.layers):
            attention = layer.attention.self
            query, keys, values = project_heads(
                hidden, (attention.query, attention.key, attention.value), self.num_heads
            )
            context = F.scaled_dot_product_attention(query, keys, values, attn_mask=padding)
            hidden = add_norm(layer.attention.output, merge_heads(context), hidden)
            if images is not None:
                image_keys, image_values = images[index]
                query = split_heads(linear(hidden, layer.crossattention.self.query), self.num_heads)
                context = F.scaled_dot_product_attention(query, image_keys[owner], image_values[owner])
                hidden = add_norm(layer.crossattention.output, merge_heads(context), hidden)
            hidden = feed_forward(layer, hidden)
        return hidden
