"""transformers' BERT blocks (as BLIP's text encoder and decoder use them) called as functions on their weights.

The inference paths (`blip_encoder`, `blip_decoder`) use these instead of calling the modules, which
saves their per-call overhead (hooks, masks, cache objects) while doing the same arithmetic in the same
order. Shapes: B rows, L tokens, D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(states: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(states, layer.weight, layer.bias)


def layer_norm(norm: torch.nn.LayerNorm, states: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(states, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def add_norm(output: torch.nn.Module, states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A BERT output block: dense, then LayerNorm of the sum with the residual."""
    return layer_norm(output.LayerNorm, linear(states, output.dense) + residual)


def feed_forward(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A BERT layer's intermediate + output blocks: (..., D) -> (..., D)."""
    intermediate = layer.intermediate
    return add_norm(layer.output, intermediate.intermediate_act_fn(linear(hidden, intermediate.dense)), hidden)


def embed(embeddings: torch.nn.Module, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, L) ids at positions offset.. -> (B, L, D), as BlipTextEmbeddings."""
    positions = embeddings.position_embeddings.weight[offset : offset + input_ids.shape[1]]
    return layer_norm(embeddings.LayerNorm, F.embedding(input_ids, embeddings.word_embeddings.weight) + positions)


def split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D / H), or (B, D) -> (B, H, D / H)."""
    if states.ndim == 2:
        return states.view(len(states), num_heads, -1)
    return states.view(*states.shape[:2], num_heads, -1).transpose(1, 2)


def project_heads(
    states: torch.Tensor, projections: tuple[torch.nn.Linear, ...], num_heads: int
) -> tuple[torch.Tensor, ...]:
    """Each of `projections` applied to (B, L, D) states, split into heads: (B, H, L, D / H) each."""
    return tuple(split_heads(linear(states, projection), num_heads) for projection in projections)


def cross_keys_values(
    layer: torch.nn.Module, image_embeds: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's cross-attention keys and values of (n, 1+P, Dv) image embeddings: (n, H, 1+P, D / H) each.
    The encoder and the decoder share these weights, so both compute them here."""
    cross = layer.crossattention.self
    return project_heads(image_embeds, (cross.key, cross.value), num_heads)


def merge_heads(context: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D / H) -> (B, L, D)."""
    return context.transpose(1, 2).flatten(2)
