"""CLIP ranker: scores candidate captions by image-text cosine similarity (BLIP-2 / LAION-COCO recipe).

The ranker is an open_clip model, trained or loaded independently of the BLIP filter. Architectures are
open_clip JSON configs: open_clip's own (``ViT-B-32``, ``ViT-L-14``, ...) plus ours in
``vlp_core/configs/clip/`` (``clip_tiny``). Weights only ever come from a local file (safetensors, or a
tensors-only ``torch.load(weights_only=True)``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from vlp_core.atomic import atomic_write_file
from vlp_core.checkpoint import load_state_dict_file, require_finite
from vlp_core.data import PixelTransform
from vlp_core.storage import Location, location

CLIP_CONFIG_DIR = Path(__file__).parent / "configs" / "clip"


def _register_our_configs() -> None:
    """Make ``vlp_core/configs/clip/*.json`` known to open_clip (once)."""
    if not all(path.stem in open_clip.list_models() for path in CLIP_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CLIP_CONFIG_DIR)


class ClipRanker:
    """An open_clip model in eval mode with its tokenizer and image transform.

    Shapes: N images, E embedding width, K_i candidate captions of image i.
    """

    def __init__(
        self, model_name: str, model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, device: torch.device
    ) -> None:
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # PIL image -> (3, H, W) normalised tensor
        self.device = device

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """``K`` captions -> ``(K, context_length)`` token ids on the model's device (tokenized on the CPU)."""
        with torch.device("cpu"):  # open_clip's tokenizer makes its tensor without naming a device
            tokens = self.tokenizer(captions)
        return tokens.to(self.device, non_blocking=True)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` preprocessed images -> ``(N, E)`` L2-normalised features (float32).
        Compute once per image and reuse for all of its candidates."""
        with self._autocast():
            features = self.model.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """``K`` captions -> ``(K, E)`` L2-normalised features (float32)."""
        with self._autocast():
            features = encode_text_to_last_token(self.model, self.tokens(captions))
        return F.normalize(features.float(), dim=-1)

    def scores(self, image_features: torch.Tensor, captions: list[list[str]]) -> list[torch.Tensor]:
        """Cosine similarity of each image with each of its candidates.

        Args:
            image_features: ``(N, E)`` from :meth:`image_features`.
            captions: N lists, the candidates of image i (possibly empty).

        Returns:
            N tensors, the i-th of shape ``(K_i,)`` on the CPU.
        """
        if len(captions) != len(image_features):
            raise ValueError(f"got {len(image_features)} images but {len(captions)} caption lists")
        flat = [caption for candidates in captions for caption in candidates]
        if not flat:
            return [torch.zeros(0, device="cpu") for _ in captions]
        text_features = self.text_features(flat).split([len(candidates) for candidates in captions])
        image_features = image_features.to(self.device)
        return [(text @ image).cpu() for image, text in zip(image_features, text_features)]

    def contrastive_loss(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """open_clip's symmetric InfoNCE on a batch of N matched pairs, for training the ranker."""
        with self._autocast():
            image_features = self.model.encode_image(images.to(self.device), normalize=True)
            text_features = self.model.encode_text(self.tokens(captions), normalize=True)
        loss = ClipLoss()(image_features.float(), text_features.float(), self.model.logit_scale.exp())
        return {"contrastive_loss": loss}


def encode_text_to_last_token(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` of ``(K, context_length)`` tokens -> ``(K, E)`` features, run only up to
    the longest caption's end token instead of the whole context (77 tokens for open_clip's ViTs).

    With a causal mask and pooling at the end token, a caption's feature never sees the padding after it,
    so cutting the padding changes nothing but the cost. Other text towers run ``encode_text`` as is.
    """
    length = int((tokens != 0).sum(dim=1).max())  # the tokenizer pads with 0 after [EOT]
    trimmable = isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None
    if not trimmable or length >= tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    hidden = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    hidden = model.ln_final(model.transformer(hidden, attn_mask=model.attn_mask[:length, :length]))
    pooled = hidden[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)]  # the end token
    projection = model.text_projection
    if isinstance(projection, torch.nn.Linear):
        return projection(pooled)
    return pooled if projection is None else pooled @ projection


def _require_known(model_name: str) -> None:
    _register_our_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {model_name!r}; known: {sorted(open_clip.list_models())}")


def clip_transform(model_name: str) -> PixelTransform:
    """How CLIP `model_name` reads an image (its preprocess), without building its weights (for decode workers)."""
    _require_known(model_name)
    return open_clip_preprocess(model_name)


def open_clip_preprocess(model_name: str) -> PixelTransform:
    """open_clip's inference preprocess of `model_name` (an architecture, or `local-dir:FOLDER`); the model is
    built on the meta device, so no weights are made or read."""
    with torch.device("meta"):
        _, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, load_weights=False, device="meta"
        )
    return preprocess


def load_clip(model_name: str, checkpoint: Location | None = None, device: str | torch.device = "cpu") -> ClipRanker:
    """Build open_clip architecture ``model_name`` (randomly initialised) and load ``checkpoint`` if given:
    a ``.safetensors`` file or a plain tensor state dict in ``.pt/.pth/.bin`` (never unpickled).

    The model is returned in eval mode; call ``ranker.model.train()`` to train it.
    """
    _require_known(model_name)
    device = torch.device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    if checkpoint is not None:
        if not location(checkpoint).is_file():
            raise FileNotFoundError(f"CLIP checkpoint {checkpoint} does not exist")
        state_dict = load_state_dict_file(checkpoint)
        require_finite(state_dict.items(), checkpoint)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(f"{checkpoint} does not hold weights for CLIP {model_name!r}: {error}") from error
    model.eval()
    return ClipRanker(model_name, model, open_clip.get_tokenizer(model_name), preprocess, device)


def save_clip(ranker: ClipRanker, path: Location) -> None:
    """Write the ranker's weights to a ``.safetensors`` file (local or remote), atomically."""
    path = location(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_clip writes safetensors; give a path ending in .safetensors, not {path}")
    state_dict = {key: value.detach().contiguous().cpu() for key, value in ranker.model.state_dict().items()}
    atomic_write_file(path, lambda temporary: save_file(state_dict, temporary))
