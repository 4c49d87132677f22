"""Model architecture and pretraining hyper-parameters as data.

A preset is a JSON file in ``vlp_core/configs/`` that maps one-to-one onto :class:`BlipConfig`.
Every field is checked when the dataclass is built, so a bad preset fails with a message that names
the field, the value and what is expected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import BlipTextConfig, BlipVisionConfig

PRESET_DIR = Path(__file__).parent / "configs"

# CLIP's normalisation statistics, which BLIP uses for its ViT.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(condition: bool, owner: str, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{owner}.{name} must be {expected} (got {value!r})")


def _require_positive_ints(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        _require(ok, type(owner).__name__, name, value, "a positive integer")


def _require_heads_divide_width(owner: VisionConfig | TextConfig) -> None:
    _require(
        owner.hidden_size % owner.num_heads == 0,
        type(owner).__name__,
        "num_heads",
        owner.num_heads,
        f"a divisor of hidden_size={owner.hidden_size}",
    )


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with the list of known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{cls.__name__}: {error}") from error


VISION_STEMS = ("patch", "conv")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder: ``(B, 3, image_size, image_size)`` -> ``(B, 1 + (image_size/patch_size)^2, hidden_size)``.

    ``stem`` makes the patch tokens: ``"patch"`` (ViT's, one linear map per patch; transformers' BLIP layout)
    or ``"conv"`` (``vlp_core.vision_stem.ConvStem``: stride-2 convolutions with BatchNorm, which learn far
    faster from scratch on small budgets; no transformers counterpart, so such a model does not export).
    """

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    stem: str = "patch"

    def __post_init__(self) -> None:
        _require_positive_ints(self, *(f.name for f in fields(self) if f.name != "stem"))
        _require_heads_divide_width(self)
        _require(self.stem in VISION_STEMS, "VisionConfig", "stem", self.stem, f"one of {', '.join(VISION_STEMS)}")
        if self.stem == "conv":
            halvings = self.patch_size.bit_length() - 1
            _require(
                self.patch_size >= 4 and self.patch_size == 2**halvings and self.hidden_size % 2 ** (halvings - 1) == 0,
                "VisionConfig",
                "patch_size",
                self.patch_size,
                "a power of two ≥ 4 for a conv stem, with hidden_size divisible by patch_size / 2",
            )
        _require(
            self.image_size % self.patch_size == 0,
            "VisionConfig",
            "patch_size",
            self.patch_size,
            f"a divisor of image_size={self.image_size}",
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_hf(self) -> BlipVisionConfig:
        if self.stem != "patch":
            raise ValueError(
                f"a vision tower with a {self.stem} stem has no transformers BLIP counterpart; "
                "only patch-stem models (the base and large presets) convert to that layout"
            )
        return BlipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            initializer_range=0.02,  # transformers' default (1e-10) is for loading, not training
        )

    @classmethod
    def from_hf(cls, hf: BlipVisionConfig) -> VisionConfig:
        return cls(
            image_size=hf.image_size,
            patch_size=hf.patch_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
        )


@dataclass(frozen=True)
class TextConfig:
    """BERT-style text transformer (MED): ``(B, L)`` token ids -> ``(B, L, hidden_size)``.

    ``initializer_range`` is the std of the random weights a model built from this config starts with
    (transformers' ``initializer_range``). With BERT's 0.02 the [CLS] output of a post-LN encoder is almost
    the same for every caption at first (attention adds ~5 % to the residual), which is one cause of ITC's
    plateau from scratch; 0.1 shortens it (see docs/architecture.md, "Training recipe from scratch").
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _require_positive_ints(
            self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position"
        )
        _require_heads_divide_width(self)
        _require(0.0 <= self.dropout < 1.0, "TextConfig", "dropout", self.dropout, "in [0, 1)")
        std = self.initializer_range
        ok = isinstance(std, (int, float)) and not isinstance(std, bool) and 0.0 < std <= 1.0
        _require(ok, "TextConfig", "initializer_range", std, "a number in (0, 1]")

    def to_hf(
        self, encoder_hidden_size: int, pad_id: int = 0, bos_id: int | None = None, sep_id: int | None = None
    ) -> BlipTextConfig:
        """transformers config; ``encoder_hidden_size`` is the vision width the cross-attention reads."""
        return BlipTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            encoder_hidden_size=encoder_hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            initializer_range=self.initializer_range,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            sep_token_id=sep_id,
            eos_token_id=sep_id,
        )

    @classmethod
    def from_hf(cls, hf: BlipTextConfig) -> TextConfig:
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position=hf.max_position_embeddings,
            dropout=float(hf.hidden_dropout_prob),
            initializer_range=float(hf.initializer_range),
        )


CAPTION_PROMPT = "a picture of "  # BLIP's captioner: fine-tuned and sampled after this prefix
DEFAULT_MIN_CROP_AREA = 0.8  # training crops keep 80-100 % of an image's area


@dataclass(frozen=True)
class BlipConfig:
    """The whole BLIP model plus the pretraining hyper-parameters that live with it.

    embed_dim: width E of the ITC projections. queue_size: ITC momentum queue length (a multiple of
    the global batch size). momentum: EMA factor of the momentum encoders. alpha: weight of the
    momentum-distilled targets. temp: initial ITC temperature. label_smoothing: for the LM loss.
    prompt: caption prefix the decoder is trained and sampled with: "" after pretraining (BLIP's LM
    objective has none), CAPTION_PROMPT after captioner fine-tuning. max_text_length: tokens per text.
    min_crop_area: a training image is a random crop of at least this share of its area, resized back;
    1.0 trains on whole images (where captions name positions near the edges, a crop can make them false).
    """

    vision: VisionConfig
    text: TextConfig
    embed_dim: int = 256
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4
    temp: float = 0.07
    label_smoothing: float = 0.1
    prompt: str = CAPTION_PROMPT
    max_text_length: int = 35
    image_mean: tuple[float, float, float] = CLIP_IMAGE_MEAN
    image_std: tuple[float, float, float] = CLIP_IMAGE_STD
    min_crop_area: float = DEFAULT_MIN_CROP_AREA
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        _require(isinstance(self.vision, VisionConfig), "BlipConfig", "vision", self.vision, "a VisionConfig")
        _require(isinstance(self.text, TextConfig), "BlipConfig", "text", self.text, "a TextConfig")
        _require_positive_ints(self, "embed_dim", "queue_size", "max_text_length")
        _require(0.0 < self.momentum < 1.0, "BlipConfig", "momentum", self.momentum, "in (0, 1)")
        _require(0.0 <= self.alpha <= 1.0, "BlipConfig", "alpha", self.alpha, "in [0, 1]")
        _require(0.0 < self.temp <= 1.0, "BlipConfig", "temp", self.temp, "in (0, 1]")
        _require(0.0 <= self.label_smoothing < 1.0, "BlipConfig", "label_smoothing", self.label_smoothing, "in [0, 1)")
        _require(isinstance(self.prompt, str), "BlipConfig", "prompt", self.prompt, "a string")
        _require(0.0 < self.min_crop_area <= 1.0, "BlipConfig", "min_crop_area", self.min_crop_area, "in (0, 1]")
        _require(
            self.max_text_length <= self.text.max_position,
            "BlipConfig",
            "max_text_length",
            self.max_text_length,
            f"at most text.max_position={self.text.max_position}",
        )
        for name in ("image_mean", "image_std"):
            value = tuple(getattr(self, name))
            _require(
                len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
                "BlipConfig",
                name,
                value,
                "three numbers (one per RGB channel)",
            )
            object.__setattr__(self, name, tuple(float(v) for v in value))
        _require(all(s > 0 for s in self.image_std), "BlipConfig", "image_std", self.image_std, "positive")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``BlipConfig.from_dict(c.to_dict()) == c``."""
        data = asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlipConfig:
        if not isinstance(data, dict) or "vision" not in data or "text" not in data:
            raise ValueError("BlipConfig needs a JSON object with 'vision' and 'text' sections")
        sections = {"vision": _from_dict(VisionConfig, data["vision"]), "text": _from_dict(TextConfig, data["text"])}
        return _from_dict(cls, {**data, **sections})


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> BlipConfig:
    """The preset ``vlp_core/configs/<name>.json`` as a validated :class:`BlipConfig`."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available presets: {preset_names()}")
    try:
        return BlipConfig.from_dict(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"invalid preset {path}: {error}") from error
