"""The ViT's self-attention through `scaled_dot_product_attention` on a GPU.

transformers' `BlipAttention` runs softmax(QKᵀ / √d)·V as separate eager operations and writes the whole
(B, heads, 1+P, 1+P) score matrix to memory: at 384 px that is 577² scores per head and image, which
makes our ViT-B/16 several times slower than timm's on a GPU (#16). `SdpaVisionAttention` keeps the same
parameters (`qkv`, `projection`) and names, so checkpoints and transformers' layout do not change; on a
GPU it calls PyTorch's fused kernels (flash / memory-efficient attention), on the CPU transformers' own
eager attention, which the tiny recipe was measured with (the CPU kernel rounds differently, and every
trained figure would move).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.blip.modeling_blip import BlipAttention, BlipVisionModel


class SdpaVisionAttention(BlipAttention):
    """`BlipAttention` with fused attention on a GPU. Shapes: B images, T = 1 + P tokens, D width."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, T, D)`` -> ``((B, T, D), attention probabilities or None)``, as ``BlipAttention`` returns."""
        if hidden_states.is_cuda:
            return self.fused(hidden_states), None
        return super().forward(hidden_states, **kwargs)

    def fused(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)`` through ``scaled_dot_product_attention`` (any device)."""
        batch, tokens, width = hidden_states.shape
        query, key, value = (
            self.qkv(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # each (B, heads, T, head_dim)
        dropout = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        return self.projection(context.transpose(1, 2).reshape(batch, tokens, width))


def use_fused_attention(vision_model: BlipVisionModel) -> None:
    """Replace every layer's ``self_attn`` by an `SdpaVisionAttention` holding the same parameter tensors.
    Built on the meta device, it draws no random numbers: a seed gives the same model as before."""
    for layer in vision_model.encoder.layers:
        with torch.device("meta"):
            attention = SdpaVisionAttention(layer.self_attn.config)
        attention.load_state_dict(layer.self_attn.state_dict(keep_vars=True), assign=True)
        layer.self_attn = attention.train(layer.self_attn.training)
