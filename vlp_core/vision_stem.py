"""A convolutional stem for the ViT: the patch tokens of a small model trained from scratch.

ViT's stem is one linear map per patch. Stacked stride-2 3×3 convolutions with BatchNorm instead (Xiao et
al. 2021, "Early convolutions help transformers see better") let a tiny BLIP learn shapes, colours and
positions in a fraction of the steps (docs/architecture.md, "Vision tower probes"). It replaces
``BlipVisionModel.embeddings.patch_embedding`` in place, so the [CLS] token, position embeddings and
transformer layers stay transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """``(B, 3, S, S)`` -> ``(B, hidden_size, S / patch_size, S / patch_size)``, like the patch convolution.

    log2(patch_size) stride-2 3×3 convolutions double the channels up to ``hidden_size`` (BatchNorm after
    each, GELU between them), then a 1×1 convolution mixes the channels.
    """

    def __init__(self, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        halvings = patch_size.bit_length() - 1
        widths = [hidden_size // 2 ** (halvings - 1 - k) for k in range(halvings)]
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.GELU()]
            channels = width
        self.convolutions = nn.Sequential(*layers[:-1])  # no GELU before the 1×1 projection
        self.projection = nn.Conv2d(hidden_size, hidden_size, 1)

    @property
    def weight(self) -> torch.Tensor:
        """The projection's weight: transformers casts the pixels to ``patch_embedding.weight.dtype``."""
        return self.projection.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.convolutions(pixel_values))
