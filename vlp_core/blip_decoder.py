"""BLIP's text decoder run one token at a time for captioning, with its own key/value caches.

`BlipDecoder` reads the weights of the model's transformers modules (`text_decoder`) and calls them as
functions: the same arithmetic as `BlipTextLMHeadModel` with a cache, without its per-call overhead
(cache objects, attention masks, module hooks). It implements `vlp_core.generation.TokenDecoder`.
Shapes: N images, B rows (captions or beams being decoded), D text width, P patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp_core.bert_blocks import (
    add_norm,
    cross_keys_values,
    embed,
    feed_forward,
    layer_norm,
    linear,
    merge_heads,
    project_heads,
    split_heads,
)
from vlp_core.blip import BlipModel

COMPACT_BELOW = 0.5  # the self-attention cache is compacted when fewer of its slots are live


class BlipDecoder:
    """BLIP's text decoder run one token at a time, on the weights of `model.text_decoder`.

    - self-attention keys/values live in one preallocated buffer (layers, 2, prompt + max_new, slots,
      heads, head_dim), written in place at each step. Positions come first, so that the tokens so far
      are one contiguous block: decoding is bound by reading them, and a strided read was ~3x slower.
      A dropped row keeps its slot until fewer than `COMPACT_BELOW` of the slots are live: only the
      self-attention still runs over dead slots, every other operation over live rows only. So the
      buffer is not copied at every drop;
    - each layer's query, key and value projections are one product per step (their weights are
      concatenated once per decoder, the only copy of a weight it makes);
    - cross-attention keys/values are computed once per image and never repeated per row: the
      rows of an image attend to them together, one (width x patches) product per image and head,
      `width` being the most rows any image has left. While every image has that many (e.g. one
      image per batch) the rows are that grid already and are neither scattered into it nor gathered;
    - logits are computed only for the ids below `vocab_limit` (the ones a tokenizer can decode).

    Rows are image-major after `start`; `keep` may drop, reorder and repeat them. The arithmetic is
    transformers' (the same weights and operations); cross-attention and the prompt go through
    `scaled_dot_product_attention`, each new token's self-attention through `_attend_one`.
    """

    def __init__(
        self,
        model: BlipModel,
        image_embeds: torch.Tensor,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        vocab_limit: int | None = None,
    ):
        """image_embeds (N, 1+P, Dv); prompt_ids (Lp,) starting with [DEC]."""
        decoder = model.text_decoder
        self.embeddings = decoder.bert.embeddings
        self.layers = list(decoder.bert.encoder.layer)
        self.head = decoder.cls.predictions
        self.vocab_limit = vocab_limit or model.config.text.vocab_size
        self.logit_weight = self.head.decoder.weight[: self.vocab_limit]  # views, sliced once
        self.logit_bias = self.head.decoder.bias[: self.vocab_limit]
        self.query_key_value = [_fused_projection(layer.attention.self) for layer in self.layers]
        self.num_heads = model.config.text.num_heads
        self.image_embeds = image_embeds
        self.prompt_ids = prompt_ids
        self.max_length = len(prompt_ids) + max_new_tokens
        self.length = 0  # tokens in every row's self-attention cache
        self.width = 1  # rows per image in the cross-attention grid
        self.self_cache = torch.empty(0)  # (layers, 2, max_length, slots, heads, head_dim)
        self.live: torch.Tensor | None = None  # (B,) the slot of each row; None: row i is in slot i
        self.cross_cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, keys and values (n, heads, 1+P, hd)
        self.row_image = torch.empty(0)  # (B,) each row's image in the cross cache
        self.grid_slot: torch.Tensor | None = None  # (B,) image * width + rank of the row among its image's
        # rows; None: row i is grid slot i

    def start(self, copies: int) -> torch.Tensor:
        num_images, device, heads = len(self.image_embeds), self.image_embeds.device, self.num_heads
        hidden = embed(self.embeddings, self.prompt_ids.expand(num_images, -1))  # (N, Lp, D): the prompt once per image
        self.cross_cache = []
        for index, layer in enumerate(self.layers):
            attention = layer.attention.self
            query, keys, values = project_heads(hidden, (attention.query, attention.key, attention.value), heads)
            if index == 0:
                self.self_cache = keys.new_empty(
                    len(self.layers), 2, self.max_length, num_images * copies, heads, keys.shape[-1]
                )
            prompt_cache = torch.stack([keys, values]).repeat_interleave(copies, 1)  # (2, slots, heads, Lp, hd)
            self.self_cache[index, :, : keys.shape[2]] = prompt_cache.permute(0, 3, 1, 2, 4)
            context = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
            hidden = add_norm(layer.attention.output, merge_heads(context), hidden)
            self.cross_cache.append(cross_keys_values(layer, self.image_embeds, heads))
            query = split_heads(linear(hidden, layer.crossattention.self.query), heads)
            context = F.scaled_dot_product_attention(query, *self.cross_cache[-1])
            hidden = feed_forward(layer, add_norm(layer.crossattention.output, merge_heads(context), hidden))
        self.length, self.width, self.live, self.grid_slot = len(self.prompt_ids), copies, None, None
        self.row_image = torch.arange(num_images, device=device).repeat_interleave(copies)
        return self._logits(hidden[:, -1]).repeat_interleave(copies, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = embed(self.embeddings, tokens.unsqueeze(1), self.length)[:, 0]  # (B, D)
        for index, layer in enumerate(self.layers):
            hidden = add_norm(layer.attention.output, self._self_attend(index, hidden), hidden)
            hidden = add_norm(layer.crossattention.output, self._cross_attend(index, layer, hidden), hidden)
            hidden = feed_forward(layer, hidden)
        self.length += 1
        return self._logits(hidden)

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.row_image.device)
        live = rows if self.live is None else self.live[rows]
        if len(live) < COMPACT_BELOW * self.self_cache.shape[3] or len(live.unique()) < len(live):
            self.self_cache = self.self_cache[:, :, :, live]  # a repeated row needs its own copy of the cache
            live = None
        self.live = live
        images, self.row_image = self.row_image[rows].unique(return_inverse=True)
        if len(images) < len(self.cross_cache[0][0]):  # all rows of some images finished: drop those images
            self.cross_cache = [(keys[images], values[images]) for keys, values in self.cross_cache]
        positions = torch.arange(len(rows), device=rows.device)
        ordered, order = self.row_image.sort(stable=True)
        rank = torch.empty_like(order)
        rank[order] = positions - torch.searchsorted(ordered, ordered)
        self.width = int(rank.max()) + 1
        grid_slot = self.row_image * self.width + rank
        in_place = len(rows) == len(images) * self.width and bool((grid_slot == positions).all())
        self.grid_slot = None if in_place else grid_slot

    def _self_attend(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D): each row's new token against its cached tokens and itself (added to the cache)."""
        cache, position = self.self_cache[index], self.length
        query, key, value = (
            F.linear(hidden, *self.query_key_value[index]).view(len(hidden), 3, self.num_heads, -1).unbind(1)
        )  # (B, heads, hd) each
        slots = slice(None) if self.live is None else self.live
        cache[0, position, slots], cache[1, position, slots] = key, value
        # dead slots attend too: cheaper than gathering the live ones' cache
        query = _spread(query, self.live, cache.shape[2])
        context = _attend_one(query, cache[0, : position + 1], cache[1, : position + 1])
        return context[slots].flatten(1)

    def _cross_attend(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D): each row's query against its image's keys/values, batched per image."""
        keys, values = self.cross_cache[index]
        queries = _spread(linear(hidden, layer.crossattention.self.query), self.grid_slot, len(keys) * self.width)
        queries = queries.view(len(keys), self.width, self.num_heads, -1).transpose(1, 2)
        context = F.scaled_dot_product_attention(queries, keys, values)  # (n, heads, width, head_dim)
        context = context.transpose(1, 2).reshape(len(keys) * self.width, -1)
        return context if self.grid_slot is None else context[self.grid_slot]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, vocab_limit) float logits, as BlipTextLMPredictionHead."""
        transform = self.head.transform
        hidden = layer_norm(transform.LayerNorm, transform.transform_act_fn(linear(hidden, transform.dense)))
        return F.linear(hidden, self.logit_weight, self.logit_bias).float()


def _fused_projection(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A self-attention's query, key and value projections as one: (3D, D) weight, (3D,) bias."""
    parts = (attention.query, attention.key, attention.value)
    return torch.cat([part.weight for part in parts]), torch.cat([part.bias for part in parts])


def _spread(rows: torch.Tensor, slots: torch.Tensor | None, count: int) -> torch.Tensor:
    """(B, ...) rows placed at `slots` (B,) of a zeroed (count, ...) tensor; the rows themselves when
    `slots` is None (row i is slot i)."""
    if slots is None:
        return rows
    return rows.new_zeros(count, *rows.shape[1:]).index_copy_(0, slots, rows)


def _attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row: (B, heads, hd) against position-major (T, B, heads, hd) keys and
    values -> (B, heads, hd). Products and sums over contiguous memory: for one query per row they are
    faster than SDPA's kernels, which want (B, heads, T, hd)."""
    weights = (keys * (query * query.shape[-1] ** -0.5)).sum(dim=-1).softmax(dim=0)  # (T, B, heads)
    return (values * weights.unsqueeze(-1)).sum(dim=0)
