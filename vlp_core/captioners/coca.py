"""open_clip's CoCa as a captioner, from a folder in open_clip's released layout (`open_clip_config.json`
and `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, read with `weights_only`).

The captions come from capfilt's own sampling loop (`vlp_core.generation.sample_tokens`) over CoCa's
multimodal decoder: the same nucleus rule, per-image draws and length rules as every other backend.
Each image is encoded once; each step runs the decoder over the rows' tokens so far, as CoCa's own
`generate` does (open_clip's text decoder has no KV cache).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from vlp_core.captioners.base import Sampling
from vlp_core.checkpoint import CheckpointError, file_digest, require_finite
from vlp_core.clip import open_clip_preprocess
from vlp_core.data import PixelTransform
from vlp_core.generation import DecodingRules, nucleus_choice, row_draws, sample_tokens
from vlp_core.inference import inference_mode

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, newest first


class CocaRows:
    """CoCa's next-token logits for rows of captions (the `TokenDecoder` the sampling loop drives).

    image_embeds: (N, P, D) the image tokens the decoder attends to; prompt_ids: (T,) start tokens.
    """

    def __init__(self, model: open_clip.CoCa, image_embeds: torch.Tensor, prompt_ids: torch.Tensor) -> None:
        self.model, self.image_embeds, self.prompt_ids = model, image_embeds, prompt_ids

    def start(self, copies: int) -> torch.Tensor:
        self.image_embeds = self.image_embeds.repeat_interleave(copies, dim=0)
        self.tokens = self.prompt_ids.expand(len(self.image_embeds), -1)
        return self._next_logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.unsqueeze(1)], dim=1)
        return self._next_logits()

    def keep(self, rows: torch.Tensor) -> None:
        self.tokens, self.image_embeds = self.tokens[rows], self.image_embeds[rows]

    def _next_logits(self) -> torch.Tensor:
        """-> (B, V) float logits of the token after each row's last: CoCa's forward, with the vocabulary
        projection applied to the last position only (its own forward projects every position)."""
        _, text = self.model._encode_text(self.tokens)  # (B, T, D) token embeddings of the text tower
        decoder, length = self.model.text_decoder, text.shape[1]
        for block, cross_attention in zip(decoder.resblocks, decoder.cross_attn, strict=True):
            text = block(text, attn_mask=decoder.attn_mask[:length, :length])
            text = cross_attention(text, k_x=self.image_embeds, v_x=self.image_embeds)
        return (decoder.ln_final(text[:, -1]) @ decoder.text_projection).float()


class CocaCaptioner:
    backend = "coca"

    def __init__(self, checkpoint: Path, device: str | torch.device = "cpu", prompt: str | None = None) -> None:
        self.check(checkpoint)
        folder = Path(checkpoint)
        self.model_ref = self.digest(folder)
        self.model, _, self.transform = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
        self.model.eval()
        require_finite(self.model.state_dict().items(), folder)
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self.prompt = prompt
        start = [self.tokenizer.sot_token_id, *(self.tokenizer.encode(prompt) if prompt else [])]
        self.prompt_ids = torch.tensor(start)

    @staticmethod
    def digest(checkpoint: Path) -> str:
        return file_digest(_weights_file(Path(checkpoint)))

    @staticmethod
    def load_transform(checkpoint: Path) -> PixelTransform:
        return open_clip_preprocess(f"local-dir:{checkpoint}")

    @staticmethod
    def check(checkpoint: Path) -> None:
        """CheckpointError unless `checkpoint` is a CoCa folder in open_clip's layout."""
        folder = Path(checkpoint)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{folder} is not an open_clip model folder: {CONFIG_FILE} is missing")
        try:
            model_config = json.loads(config_path.read_text(encoding="utf-8")).get("model_cfg", {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: not a JSON object ({error})") from error
        if "multimodal_cfg" not in model_config:
            raise CheckpointError(f"{config_path}: not a CoCa model (its model_cfg has no multimodal_cfg)")
        _weights_file(folder)

    def caption(self, pixels: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> list[list[str]]:
        context = min(self.model.text.context_length, self.model.text_decoder.context_length)
        if len(self.prompt_ids) + sampling.max_length > context:
            raise ValueError(
                f"prompt ({len(self.prompt_ids)} tokens) + max_length ({sampling.max_length}) exceeds CoCa's "
                f"{context} text positions; lower max_length"
            )
        if len(pixels) == 0:
            return []
        end = self.tokenizer.eot_token_id
        rules = DecodingRules(
            end, self.tokenizer.vocab_size, sampling.min_length, sampling.max_length, sampling.repetition_penalty
        )
        with inference_mode(self.model) as device:
            _, image_embeds = self.model._encode_image(pixels.to(device))
            prompt = self.prompt_ids.to(device)
            draws = row_draws(len(pixels), sampling.num_captions, sampling.max_length, seeds=seeds, device=device)
            rows = sample_tokens(
                CocaRows(self.model, image_embeds, prompt),
                rules,
                prompt,
                sampling.num_captions,
                nucleus_choice(sampling.top_p, sampling.temperature, draws),
            )
        texts = [self.tokenizer.decode([token for token in tokens if token != end]).strip() for tokens in rows]
        return [texts[start : start + sampling.num_captions] for start in range(0, len(texts), sampling.num_captions)]


def _weights_file(folder: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({' or '.join(WEIGHTS_FILES)})")
