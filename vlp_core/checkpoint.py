"""Checkpoints: our own format, transformers' BLIP layout both ways, and safe state-dict loading.

Our checkpoint folder holds ``model.safetensors`` (shared encoder/decoder tensors stored once and
re-tied on load), ``config.json`` (the :class:`BlipConfig` and the weights' digest) and
``tokenizer/``. The digest, ``sha256:<16 hex>`` of the weights file, identifies the model in
manifests (``model_ref``). Every folder is written under a temporary name and renamed into place.

Nothing here unpickles arbitrary objects: weights come from safetensors, or from torch files through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file
from transformers import BlipConfig as HFBlipConfig
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlp_core.atomic import atomic_directory
from vlp_core.blip import BlipModel
from vlp_core.config import BlipConfig, TextConfig, VisionConfig
from vlp_core.tokenizer import load_tokenizer, special_ids

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "capfilt-blip/1"
HF_CAPFILT_KEY = "capfilt_config"  # our BlipConfig, stored inside an exported transformers config

CAPTIONER_PARTS = ("vision_model", "text_decoder")
FILTER_PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")


class UnsafeCheckpointError(RuntimeError):
    """A weights file that could only be read by unpickling arbitrary Python objects."""


def file_digest(path: str | Path) -> str:
    """``sha256:<first 16 hex digits>`` of the file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return f"sha256:{sha.hexdigest()[:16]}"


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor under one name only (the first in sorted order).

    Sorted names and no metadata make the file, hence its digest, a function of the weights alone.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor.contiguous()
    return unique


def _check_vocabulary(config: BlipConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    if len(tokenizer) > config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's text.vocab_size is {config.text.vocab_size}; "
            "build the model with a vocab_size of at least len(tokenizer)"
        )


def save_checkpoint(model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> str:
    """Write ``model`` and ``tokenizer`` to ``directory`` atomically; returns the weights' digest."""
    _check_vocabulary(model.config, tokenizer)
    with atomic_directory(directory) as staging:
        save_file(_unique_tensors(model), str(staging / WEIGHTS_FILE))
        digest = file_digest(staging / WEIGHTS_FILE)
        header = {"format": CHECKPOINT_FORMAT, "digest": digest, "config": model.config.to_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    return digest


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[BlipModel, PreTrainedTokenizerBase, str]:
    """Read a folder written by :func:`save_checkpoint`; the weights must match the stored digest."""
    folder = Path(directory)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a capfilt checkpoint: {CONFIG_FILE} is missing")
    header = json.loads(config_path.read_text())
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{config_path}: format {header.get('format')!r} is not {CHECKPOINT_FORMAT!r} "
            "(a transformers BLIP folder? use import_hf)"
        )
    digest = file_digest(folder / WEIGHTS_FILE)
    if digest != header["digest"]:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} has digest {digest}, but {CONFIG_FILE} records "
            f"{header['digest']}: the weights were modified or the copy is incomplete"
        )
    model = BlipModel(BlipConfig.from_dict(header["config"]))
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model.to(device), load_tokenizer(folder / TOKENIZER_DIR), digest


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt/.pth/.bin`` file loaded with ``weights_only=True``.

    Raises :class:`UnsafeCheckpointError` when the torch file holds anything but plain tensors and
    containers (reading it would execute arbitrary code).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in {".pt", ".pth", ".bin"}:
        raise ValueError(f"unsupported weights file {path.name!r}: expected .safetensors, .pt, .pth or .bin")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled Python objects that only a full unpickle could "
            "restore, which can run arbitrary code. Convert it to safetensors in a trusted sandbox."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (got {type(state).__name__})")
    return state


# ----------------------------------------------------------------------------- transformers layout


def _hf_config(model: BlipModel, tokenizer: PreTrainedTokenizerBase) -> HFBlipConfig:
    """transformers' config for ``model``, with our own config (and learned temperature) kept inside."""
    config, ids = model.config, special_ids(tokenizer)
    text = config.text.to_hf(config.vision.hidden_size, pad_id=ids.pad, bos_id=ids.dec, sep_id=ids.sep)
    text.label_smoothing = config.label_smoothing
    learned = dataclasses.replace(config, temp=float(model.temp.detach()))
    return HFBlipConfig(
        text_config=text.to_dict(),
        vision_config=config.vision.to_hf().to_dict(),
        image_text_hidden_size=config.embed_dim,
        label_smoothing=config.label_smoothing,
        **{HF_CAPFILT_KEY: learned.to_dict()},
    )


def _export_hf(
    model: BlipModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    hf_class: type[PreTrainedModel],
    parts: tuple[str, ...],
) -> None:
    _check_vocabulary(model.config, tokenizer)
    hf_model = hf_class(_hf_config(model, tokenizer))
    weights = {key: value for key, value in model.state_dict().items() if key.split(".")[0] in parts}
    hf_model.load_state_dict(weights, strict=True)
    size = model.config.vision.image_size
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(model.config.image_mean),
        image_std=list(model.config.image_std),
    )
    with atomic_directory(directory) as staging:
        hf_model.save_pretrained(str(staging))
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(staging))


def export_hf_captioner(model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """Write a folder that ``BlipForConditionalGeneration.from_pretrained`` and ``BlipProcessor`` load
    (vision model + text decoder; bos = ``[DEC]``, eos = ``[SEP]``)."""
    _export_hf(model, tokenizer, directory, BlipForConditionalGeneration, CAPTIONER_PARTS)


def export_hf_filter(model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """Write a folder that ``BlipForImageTextRetrieval.from_pretrained`` and ``BlipProcessor`` load
    (vision model, text encoder, ITC projections, ITM head)."""
    _export_hf(model, tokenizer, directory, BlipForImageTextRetrieval, FILTER_PARTS)


def _config_from_hf(hf_config: HFBlipConfig, name: str) -> BlipConfig:
    """Our config: the one we stored on export, or one derived from a foreign (e.g. Salesforce) folder."""
    stored = getattr(hf_config, HF_CAPFILT_KEY, None)
    if stored is not None:
        return BlipConfig.from_dict(stored)
    return BlipConfig(
        vision=VisionConfig.from_hf(hf_config.vision_config),
        text=TextConfig.from_hf(hf_config.text_config),
        embed_dim=hf_config.image_text_hidden_size,
        name=name,
    )


def _copy_self_attention(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every layer's self-attention from one BERT stack (``.encoder.layer``) to another."""
    for source_layer, target_layer in zip(source.encoder.layer, target.encoder.layer, strict=True):
        target_layer.attention.load_state_dict(source_layer.attention.state_dict())


def import_hf(directory: str | Path) -> tuple[BlipModel, PreTrainedTokenizerBase]:
    """Build a :class:`BlipModel` from a transformers BLIP folder (ours, or e.g. a local Salesforce one).

    A captioner folder (``BlipForConditionalGeneration``) fills the vision model and the decoder; the
    encoder then starts from the decoder's shared weights with a copy of its self-attention, and the
    ITC projections and ITM head stay randomly initialised. A filter folder
    (``BlipForImageTextRetrieval``) fills everything but the decoder's self-attention (copied from the
    encoder's) and its LM head transform and bias (random). A foreign folder keeps our default ITC temperature.
    """
    folder = Path(directory)
    hf_config = HFBlipConfig.from_pretrained(str(folder))
    architecture = (hf_config.architectures or [None])[0]
    hf_classes = {cls.__name__: cls for cls in (BlipForConditionalGeneration, BlipForImageTextRetrieval)}
    if architecture not in hf_classes:
        raise ValueError(
            f"{folder}: architecture {architecture!r} is not supported; expected one of {sorted(hf_classes)}"
        )
    hf_model = hf_classes[architecture].from_pretrained(str(folder), weights_only=True)
    tokenizer = load_tokenizer(folder)
    config = _config_from_hf(hf_config, name=folder.name)
    _check_vocabulary(config, tokenizer)

    model = BlipModel(config)
    model.vision_model.load_state_dict(hf_model.vision_model.state_dict())
    if architecture == "BlipForConditionalGeneration":
        model.text_decoder.load_state_dict(hf_model.text_decoder.state_dict())
        _copy_self_attention(model.text_decoder.bert, model.text_encoder)
    else:
        for part in FILTER_PARTS[1:]:
            getattr(model, part).load_state_dict(getattr(hf_model, part).state_dict())
        _copy_self_attention(model.text_encoder, model.text_decoder.bert)
    return model, tokenizer
