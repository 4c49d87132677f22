"""BLIP's multimodal mixture of encoder-decoder (MED), built from transformers' BLIP modules.

Four uses of three networks, as in the BLIP paper:

- ``vision_model`` (ViT): image -> patch embeddings, [CLS] first.
- ``text_encoder`` without an image: unimodal BERT, [CLS] feature for ITC.
- ``text_encoder`` with an image: bidirectional self-attention + cross-attention to the patches,
  ``[ENC]`` feature for ITM.
- ``text_decoder``: causal self-attention + cross-attention, ``[DEC] ... [SEP]``, for captioning.

The decoder shares every parameter with the encoder except its self-attention layers and its LM head
transform (BLIP ties them by module assignment, so one gradient step updates both). Submodule names
follow transformers' ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` layout, which
keeps checkpoint conversion a matter of picking keys. This file holds no losses.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from vlp_core.config import BlipConfig, VisionConfig, load_preset
from vlp_core.vision_attention import use_fused_attention
from vlp_core.vision_stem import ConvStem


def tie_decoder_to_encoder(decoder: BlipTextLMHeadModel, encoder: BlipTextModel) -> None:
    """Make ``decoder`` use ``encoder``'s embeddings and, in every layer, its cross-attention and
    feed-forward modules; the decoder keeps its own self-attention and LM head transform/bias.
    The LM head's output matrix stays tied to the (now shared) word embeddings."""
    decoder.bert.embeddings = encoder.embeddings
    for decoder_layer, encoder_layer in zip(decoder.bert.encoder.layer, encoder.encoder.layer, strict=True):
        decoder_layer.crossattention = encoder_layer.crossattention
        decoder_layer.intermediate = encoder_layer.intermediate
        decoder_layer.output = encoder_layer.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
    decoder.cls.predictions.decoder.bias = decoder.cls.predictions.bias


def _hf_vision_config(vision: VisionConfig) -> BlipVisionConfig:
    """transformers' config of the tower; a conv stem is swapped in afterwards (it has no such config)."""
    return dataclasses.replace(vision, stem="patch").to_hf()


class BlipModel(nn.Module):
    """BLIP MED. Shapes: B batch, L tokens, P = (image_size / patch_size)^2 patches,
    Dv / Dt vision / text width, E = ``config.embed_dim``, V vocabulary size."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        vision_width, text_width = config.vision.hidden_size, config.text.hidden_size
        text_config = config.text.to_hf(encoder_hidden_size=vision_width)

        self.vision_model = BlipVisionModel(_hf_vision_config(config.vision))
        use_fused_attention(self.vision_model)
        if config.vision.stem == "conv":
            self.vision_model.embeddings.patch_embedding = ConvStem(vision_width, config.vision.patch_size)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config)
        tie_decoder_to_encoder(self.text_decoder, self.text_encoder)

        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))

    @classmethod
    def from_preset(cls, name: str) -> BlipModel:
        return cls(load_preset(name))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, 1 + P, Dv)`` patch embeddings ([CLS] first)."""
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (B, 3, {size}, {size}) for this model, got "
                f"{tuple(pixel_values.shape)}; resize images with the model's image transform"
            )
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + P, Dv)`` -> ``(B, E)`` L2-normalised ITC feature of the [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder (no cross-attention): ``(B, L)`` ids and mask -> ``(B, L, Dt)``."""
        self._check_text(input_ids, attention_mask)
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, L, Dt)`` -> ``(B, E)`` L2-normalised ITC feature of the [CLS] token."""
        return F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image-text matching logits ``(B, 2)``, column 1 = "match".

        ``image_embeds`` ``(B, 1 + P, Dv)`` row-aligned with ``input_ids`` ``(B, L)`` whose column 0 is ``[ENC]``.
        """
        self._check_text(input_ids, attention_mask)
        hidden = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).last_hidden_state
        return self.itm_head(hidden[:, 0, :])

    def lm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits ``(B, L, V)`` of the image-grounded causal decoder; position t predicts token t+1.

        ``image_embeds`` ``(B, 1 + P, Dv)``; ``input_ids`` ``(B, L)`` start with ``[DEC]``.
        """
        self._check_text(input_ids, attention_mask)
        return self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).logits

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[1] > self.config.text.max_position:
            raise ValueError(
                f"texts of {input_ids.shape[1]} tokens exceed text.max_position="
                f"{self.config.text.max_position}; tokenize with a smaller max_length"
            )

    @staticmethod
    def _image_mask(image_embeds: torch.Tensor) -> torch.Tensor:
        """All patches are attended: ``(B, 1 + P)`` ones on the embeddings' device."""
        return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
