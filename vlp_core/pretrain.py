"""BLIP's training step: ITC + ITM + LM on one batch, with momentum encoders and feature queues.

The same module serves the three trainings of CapFilt, chosen by ``objectives``:

- ``PRETRAIN`` (itc, itm, lm): BLIP pretraining.
- ``CAPTIONER`` (lm): fine-tune the captioner (no momentum model, no queues).
- ``FILTER`` (itc, itm): fine-tune the filter.

The training loop stays with the caller (a stage); this file gives it ``forward -> dict of losses``,
``configure_optimizer`` and ``prompt_length``. Shapes: B batch, L tokens, E projection width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlp_core.blip import BlipModel
from vlp_core.inference import model_device
from vlp_core.losses import itc_loss, itm_loss, lm_loss, sample_hard_negatives
from vlp_core.momentum import FeatureQueue, ema_update, gather_from_all_ranks
from vlp_core.tokenizer import SpecialIds

PRETRAIN = ("itc", "itm", "lm")
CAPTIONER = ("lm",)
FILTER = ("itc", "itm")

MOMENTUM_PARTS = ("vision_model", "vision_proj", "text_encoder", "text_proj")  # BLIP's unimodal encoders
TEMP_RANGE = (0.001, 0.5)


def prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Number of leading decoder tokens (``[DEC]`` + the prompt's tokens) that are never LM targets."""
    return len(tokenizer(prompt).input_ids) - 1  # [CLS]/[DEC] + prompt, without the closing [SEP]


class BlipPretrainer(nn.Module):
    """A :class:`BlipModel` plus what its training needs: momentum copies of the unimodal encoders and
    projections (never trained, updated by EMA) and the ITC queues of momentum features."""

    def __init__(
        self, model: BlipModel, special: SpecialIds, prompt_length: int = 1, objectives: tuple[str, ...] = PRETRAIN
    ) -> None:
        super().__init__()
        self.objectives = self._checked_objectives(objectives, allowed=PRETRAIN)
        self.model = model
        self.special = special
        self.prompt_length = prompt_length
        config = model.config
        if "itc" in objectives:
            self.momentum_model = copy.deepcopy(model).requires_grad_(False)
            del self.momentum_model.text_decoder, self.momentum_model.itm_head  # only the encoders are needed
            device = model_device(model)  # the queues live with the model, wherever it was placed
            self.image_queue = FeatureQueue(config.embed_dim, config.queue_size, device)
            self.text_queue = FeatureQueue(config.embed_dim, config.queue_size, device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        alpha: float,
        generator: torch.Generator | None = None,
        hardness: float = 1.0,
        objectives: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's losses.

        Args:
            pixel_values: (B, 3, H, W) normalised images.
            input_ids, attention_mask: (B, L) captions as ``tokenize`` returns them (``[CLS] ... [SEP]``);
                for the LM objective they start with the prompt, ``prompt_length`` tokens long.
            image_ids: (B,) long; pairs with equal ids show the same image (ITC positives, never ITM
                negatives).
            alpha: momentum distillation weight (see ``momentum.alpha_ramp``).
            generator: makes the ITM negative sampling reproducible.
            hardness: ITM negative sampling, from uniform (0) to BLIP's ITC-weighted (1).
            objectives: this step's subset of the trainer's objectives (default: all of them), e.g.
                ITC alone while the encoders warm up.

        Returns:
            ``loss`` (the sum to back-propagate) and each objective's terms (``itc_loss``,
            ``itm_loss``, ``itm_accuracy``, ``lm_loss``).
        """
        objectives = self._checked_objectives(objectives or self.objectives, allowed=self.objectives)
        on_cuda = pixel_values.device.type == "cuda"
        with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            image_embeds = self.model.encode_image(pixel_values)  # (B, 1+P, Dv)
            out: dict[str, torch.Tensor] = {}
            if "itc" in objectives:
                itc = self._contrastive(image_embeds, pixel_values, input_ids, attention_mask, image_ids, alpha)
                out["itc_loss"] = itc["itc_loss"]
            if "itm" in objectives:
                out |= self._matching(
                    image_embeds,
                    input_ids,
                    attention_mask,
                    image_ids,
                    itc["sim_i2t"],
                    itc["sim_t2i"],
                    generator,
                    hardness,
                )
            if "lm" in objectives:
                decoder_ids = self._with_first_token(input_ids, self.special.dec)
                logits = self.model.lm_logits(image_embeds, decoder_ids, attention_mask)
                out |= lm_loss(
                    logits, decoder_ids, attention_mask, self.prompt_length, self.model.config.label_smoothing
                )
        out["loss"] = sum(out[f"{objective}_loss"] for objective in objectives)
        return out

    @staticmethod
    def _checked_objectives(objectives: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(objectives) - set(allowed)
        if unknown or not objectives:
            raise ValueError(f"objectives must be a non-empty subset of {allowed}, got {objectives}")
        if "itm" in objectives and "itc" not in objectives:
            raise ValueError("the ITM objective mines its negatives from ITC similarities: add 'itc'")
        return tuple(objectives)

    def _contrastive(
        self,
        image_embeds: torch.Tensor,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        alpha: float,
    ) -> dict[str, torch.Tensor]:
        """ITC against momentum features and the queues; updates the momentum model and queues when training."""
        model, momentum = self.model, self.momentum_model
        with torch.no_grad():
            model.temp.clamp_(*TEMP_RANGE)
        image_features = model.image_features(image_embeds)
        text_features = model.text_features(model.encode_text(input_ids, attention_mask))
        with torch.no_grad():
            if self.training:
                for part in MOMENTUM_PARTS:
                    ema_update(getattr(model, part), getattr(momentum, part), model.config.momentum)
            image_features_m = momentum.image_features(momentum.encode_image(pixel_values))
            text_features_m = momentum.text_features(momentum.encode_text(input_ids, attention_mask))
        itc = itc_loss(
            image_features,
            text_features,
            image_features_m,
            text_features_m,
            self.image_queue.features,
            self.text_queue.features,
            self.image_queue.ids,
            image_ids,
            model.temp,
            alpha,
        )
        if self.training:
            all_ids = gather_from_all_ranks(image_ids)
            self.image_queue.enqueue(gather_from_all_ranks(image_features_m), all_ids)
            self.text_queue.enqueue(gather_from_all_ranks(text_features_m), all_ids)
        return itc

    def _matching(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        generator: torch.Generator | None,
        hardness: float,
    ) -> dict[str, torch.Tensor]:
        """ITM on B positives, B (negative image, text) and B (image, negative text) pairs."""
        neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, image_ids, generator, hardness)
        encoder_ids = self._with_first_token(input_ids, self.special.enc)
        logits = self.model.itm_logits(
            torch.cat([image_embeds, image_embeds[neg_image], image_embeds]),
            torch.cat([encoder_ids, encoder_ids, encoder_ids[neg_text]]),
            torch.cat([attention_mask, attention_mask, attention_mask[neg_text]]),
        )
        return itm_loss(logits)

    @staticmethod
    def _with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        """(B, L) copy of ``input_ids`` with column 0 ([CLS]) replaced by ``token_id`` ([ENC] or [DEC])."""
        ids = input_ids.clone()
        ids[:, 0] = token_id
        return ids


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases / norms / the temperature do not. On a GPU
    its update is one fused kernel; on the CPU it keeps PyTorch's default (the recipe was measured with it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=True if on_cuda else None)
