"""Checkpoints: our own format, transformers' BLIP layout both ways, and safe state-dict loading.

Our checkpoint folder holds ``model.safetensors`` (shared encoder/decoder tensors stored once and
re-tied on load), ``config.json`` (the :class:`BlipConfig`, the weights' digest and what each part of the
model holds) and ``tokenizer/``. The digest, ``sha256:<16 hex>`` of the weights file, identifies the model
in manifests (``model_ref``). Every folder is written atomically (``vlp_core.atomic``; in an object store
``config.json`` is written last), and may be local or remote: a remote folder is read from a local copy
(``vlp_core.storage.local_copy``).

Everything that takes a BLIP checkpoint also takes a transformers BLIP folder as ``save_pretrained``
writes it (``BlipForConditionalGeneration``: a captioner; ``BlipForImageTextRetrieval``: a filter): it is
converted on load (:func:`import_hf`), and its digest is that of its weights file.

A model has six parts (:data:`PARTS`), each ``trained`` (by capfilt), ``loaded`` (from a released
folder), ``derived`` (copied from a sibling part on import) or ``random``. A stage refuses a checkpoint
whose part it needs is random (:func:`require_parts`), e.g. a released captioner given as a filter.

Nothing here unpickles arbitrary objects: weights come from safetensors, or from torch files through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
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
from vlp_core.storage import Location, local_copy, location
from vlp_core.tokenizer import load_tokenizer, special_ids

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "capfilt-blip/1"
HF_CAPFILT_KEY = "capfilt_config"  # our BlipConfig, stored inside an exported transformers config

HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes, newest first

CAPTIONER_PARTS = ("vision_model", "text_decoder")  # the BlipModel modules of transformers' two classes
FILTER_PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")

PARTS = ("vision", "text_encoder", "itc_projections", "itm_head", "decoder", "lm_head")
CAPTIONER_NEEDS = ("vision", "decoder", "lm_head")
FILTER_NEEDS = ("vision", "text_encoder", "itc_projections", "itm_head")
OBJECTIVE_PARTS = {  # what each training objective trains
    "itc": ("vision", "text_encoder", "itc_projections"),
    "itm": ("vision", "text_encoder", "itm_head"),
    "lm": ("vision", "decoder", "lm_head"),
}
HF_CLASSES = {cls.__name__: cls for cls in (BlipForConditionalGeneration, BlipForImageTextRetrieval)}
IMPORTED_PARTS = {  # what import_hf fills, per transformers class
    "BlipForConditionalGeneration": {
        "vision": "loaded", "text_encoder": "derived", "itc_projections": "random", "itm_head": "random",
        "decoder": "loaded", "lm_head": "loaded",
    },
    "BlipForImageTextRetrieval": {
        "vision": "loaded", "text_encoder": "loaded", "itc_projections": "loaded", "itm_head": "loaded",
        "decoder": "derived", "lm_head": "random",
    },
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""


class UnsafeCheckpointError(CheckpointError):
    """A weights file that could only be read by unpickling arbitrary Python objects."""


def file_digest(*paths: str | Location) -> str:
    """``sha256:<first 16 hex digits>`` of the files' bytes (local or remote), one after the other (a sharded
    model's files in their sorted order)."""
    sha = hashlib.sha256()
    for path in paths:
        with location(path).open("rb") as stream:
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


def save_checkpoint(
    model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Location, parts: dict[str, str] | None = None
) -> str:
    """Write ``model`` and ``tokenizer`` to ``directory`` atomically; returns the weights' digest.
    ``parts``: what each of :data:`PARTS` holds; None when it is not known (nothing is refused then)."""
    _check_vocabulary(model.config, tokenizer)
    if parts is not None and set(parts) != set(PARTS):
        raise ValueError(f"parts must name each of {PARTS}, got {sorted(parts)}")
    with atomic_directory(directory, commit=(CONFIG_FILE,)) as staging:
        save_file(_unique_tensors(model), str(staging / WEIGHTS_FILE))
        digest = file_digest(staging / WEIGHTS_FILE)
        header = {"format": CHECKPOINT_FORMAT, "digest": digest, "config": model.config.to_dict(), "parts": parts}
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    return digest


def load_checkpoint(
    directory: str | Location, device: str | torch.device = "cpu"
) -> tuple[BlipModel, PreTrainedTokenizerBase, str]:
    """Read a folder written by :func:`save_checkpoint` (its weights must match the stored digest) or a
    transformers BLIP folder (converted by :func:`import_hf`; the digest is its weights file's)."""
    folder = _local(directory)
    header = _read_config(folder)
    if header.get("format") != CHECKPOINT_FORMAT:
        model, tokenizer = import_hf(folder)
        require_finite(model.state_dict().items(), folder)
        return model.to(device), tokenizer, checkpoint_digest(folder)
    digest = _checked_digest(folder, header)
    model = BlipModel(BlipConfig.from_dict(header["config"]))
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    require_finite(model.state_dict().items(), folder / WEIGHTS_FILE)
    return model.to(device), load_tokenizer(folder / TOKENIZER_DIR), digest


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str | Path) -> None:
    """CheckpointError naming the first of the (name, tensor) pairs that holds NaN or infinity (a diverged
    or corrupted model scores every sample NaN, and ranking or thresholding NaN keeps arbitrary rows)."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); the model diverged or "
                "the file is corrupt: give a checkpoint with finite weights"
            )


def checkpoint_parts(directory: str | Location) -> dict[str, str] | None:
    """What each of :data:`PARTS` holds in a capfilt checkpoint or a transformers folder; None if unknown."""
    folder = _local(directory)
    header = _read_config(folder)
    if header.get("format") == CHECKPOINT_FORMAT:
        return header.get("parts")
    return dict(IMPORTED_PARTS[_hf_architecture(folder, header)])


def random_parts(directory: str | Location, needed: tuple[str, ...]) -> list[str]:
    """The parts of `needed` that the checkpoint holds at random (none when that is not recorded)."""
    parts = checkpoint_parts(directory) or {}
    return [part for part in needed if parts.get(part) == "random"]


def require_parts(directory: str | Location, needed: tuple[str, ...], role: str) -> None:
    """CheckpointError when a part that `role` (e.g. "the caption stage") needs is random in the checkpoint."""
    random = random_parts(directory, needed)
    if random:
        raise CheckpointError(
            f"{directory}: its {' and '.join(random)} {'is' if len(random) == 1 else 'are'} initialised at random, "
            f"and {role} needs {', '.join(needed)}; give a checkpoint trained for it "
            "(a transformers captioner is BlipForConditionalGeneration, a filter BlipForImageTextRetrieval)"
        )


def check_checkpoint(directory: str | Location, needed: tuple[str, ...] = (), role: str = "") -> None:
    """Everything that can be checked without building the model, so that a bad checkpoint stops a stage
    before any work: the folder and its config, the format, the weights file (present, readable, the
    recorded digest, safe to read, tensor names and shapes the config's model has, finite values), the
    tokenizer, and that none of the parts `role` needs (:func:`require_parts`) is random."""
    folder = _local(directory)
    header = _read_config(folder)
    if header.get("format") == CHECKPOINT_FORMAT:
        weights, tokenizer_dir = folder / WEIGHTS_FILE, folder / TOKENIZER_DIR
        _checked_digest(folder, header)
        with torch.device("meta"):
            expected = BlipModel(BlipConfig.from_dict(header["config"])).state_dict()
    else:
        architecture = _hf_architecture(folder, header)
        weights, tokenizer_dir = _hf_weights_file(folder), folder
        with torch.device("meta"):
            expected = HF_CLASSES[architecture](HFBlipConfig.from_pretrained(str(folder))).state_dict()
    _check_shapes(weights, _weights_shapes(weights), {name: tuple(t.shape) for name, t in expected.items()})
    require_finite_file(weights)
    try:
        load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: its tokenizer cannot be read ({error})") from error
    require_parts(folder, needed, role)


def checkpoint_config(directory: str | Location) -> BlipConfig:
    """The model config of a capfilt checkpoint or a transformers BLIP folder, without loading its weights."""
    folder = _local(directory)
    header = _read_config(folder)
    if header.get("format") == CHECKPOINT_FORMAT:
        return BlipConfig.from_dict(header["config"])
    return _config_from_hf(HFBlipConfig.from_pretrained(str(folder)), name=folder.name)


def checkpoint_digest(directory: str | Location) -> str:
    """The digest that names a checkpoint in manifests (``model_ref``), without loading the model: a capfilt
    checkpoint's (checked against its weights), or a transformers folder's weights file's."""
    folder = _local(directory)
    header = _read_config(folder)
    if header.get("format") == CHECKPOINT_FORMAT:
        return _checked_digest(folder, header)
    return file_digest(_hf_weights_file(folder))


def convert_hf(source: str | Location, destination: str | Location) -> str:
    """Convert a transformers BLIP folder into a capfilt checkpoint once (what each part holds travels
    along), so that every actor of a cluster job loads it without converting; returns its digest."""
    check_checkpoint(source)
    model, tokenizer = import_hf(source)
    return save_checkpoint(model, tokenizer, destination, checkpoint_parts(source))


def _local(directory: str | Location) -> Path:
    """A checkpoint folder as a local folder (a local copy of a remote one)."""
    folder = location(directory)
    try:
        return local_copy(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a checkpoint: the folder is empty or missing") from None


def _read_config(folder: Path) -> dict:
    """The folder's config.json, as a dict; CheckpointError naming the file when it is missing or not JSON."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a checkpoint: {CONFIG_FILE} is missing "
            "(give a capfilt checkpoint folder or a transformers BLIP folder)"
        )
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(header).__name__}")
    return header


def _checked_digest(folder: Path, header: dict) -> str:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    digest = file_digest(weights)
    if digest != header.get("digest"):
        raise CheckpointError(
            f"{weights} has digest {digest}, but {folder / CONFIG_FILE} records "
            f"{header.get('digest')}: the weights were modified or the copy is incomplete"
        )
    return digest


def _hf_architecture(folder: Path, header: dict) -> str:
    """The transformers class a foreign folder was saved from; CheckpointError unless we can import it."""
    if header.get("format") is not None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: format {header['format']!r} is not {CHECKPOINT_FORMAT!r}")
    architecture = (header.get("architectures") or [None])[0]
    if architecture not in HF_CLASSES:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: architecture {architecture!r} is not supported; expected a capfilt "
            f"checkpoint or a transformers folder of {' or '.join(sorted(HF_CLASSES))}"
        )
    return architecture


def _hf_weights_file(folder: Path) -> Path:
    for name in HF_WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: no weights file ({' or '.join(HF_WEIGHTS_FILES)}); a sharded folder "
        "must be saved again as one file (save_pretrained(..., max_shard_size='20GB'))"
    )


def _weights_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file, read safely (safetensors header, or tensors only)."""
    if path.suffix != ".safetensors":
        return {name: tuple(tensor.shape) for name, tensor in load_state_dict_file(path).items()}
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except Exception as error:  # safetensors raises its own error types for empty and truncated files
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def require_finite_file(path: str | Location) -> None:
    """`require_finite` over a weights file (local or remote; read safely), one tensor in memory at a time
    for safetensors."""
    path = local_copy(location(path))
    if path.suffix != ".safetensors":
        require_finite(load_state_dict_file(path).items(), path)
        return
    try:
        weights = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types for empty and truncated files
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    with weights:
        require_finite(((name, weights.get_tensor(name)) for name in weights.keys()), path)


def _check_shapes(path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the file must be one the model has, with its shape (tied copies may be left out)."""
    unknown = sorted(set(found) - set(expected))
    wrong = [
        f"{name} {found[name]} (the model's is {expected[name]})"
        for name in sorted(found)
        if name in expected and found[name] != expected[name]
    ]
    if unknown or wrong or not found:
        problem = (
            f"tensors the model does not have: {unknown[:3]}"
            if unknown
            else f"wrong shapes: {wrong[:3]}"
            if wrong
            else "no tensors"
        )
        raise CheckpointError(f"{path} does not fit its config: {problem}")


def load_state_dict_file(path: str | Location) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt/.pth/.bin`` file loaded with ``weights_only=True``.

    Raises :class:`UnsafeCheckpointError` when the torch file holds anything but plain tensors and
    containers (reading it would execute arbitrary code). A remote file is read from a local copy.
    """
    path = local_copy(location(path))
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in {".pt", ".pth", ".bin"}:
        raise CheckpointError(f"unsupported weights file {path.name!r}: expected .safetensors, .pt, .pth or .bin")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled Python objects that only a full unpickle could "
            "restore, which can run arbitrary code. Convert it to safetensors in a trusted sandbox."
        ) from error
    except (EOFError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable torch file ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors (got {type(state).__name__})")
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
    directory: str | Location,
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
    with atomic_directory(directory, commit=(CONFIG_FILE,)) as staging:
        hf_model.save_pretrained(str(staging))
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(staging))


def export_hf_captioner(model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Location) -> None:
    """Write a folder that ``BlipForConditionalGeneration.from_pretrained`` and ``BlipProcessor`` load
    (vision model + text decoder; bos = ``[DEC]``, eos = ``[SEP]``)."""
    _export_hf(model, tokenizer, directory, BlipForConditionalGeneration, CAPTIONER_PARTS)


def export_hf_filter(model: BlipModel, tokenizer: PreTrainedTokenizerBase, directory: str | Location) -> None:
    """Write a folder that ``BlipForImageTextRetrieval.from_pretrained`` and ``BlipProcessor`` load
    (vision model, text encoder, ITC projections, ITM head).

    The ITM input convention: capfilt's filter (as BLIP) reads ``[ENC]`` in column 0 of ``input_ids`` where
    transformers' processor puts ``[CLS]``. To get capfilt's ITM scores from the exported model, replace
    that column: ``input_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")`` before calling it with
    ``use_itm_head=True``. ITC (``use_itm_head=False``) reads ``[CLS]`` as the processor gives it."""
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


def import_hf(directory: str | Location) -> tuple[BlipModel, PreTrainedTokenizerBase]:
    """Build a :class:`BlipModel` from a transformers BLIP folder (ours, or e.g. a local Salesforce one).

    A captioner folder (``BlipForConditionalGeneration``) fills the vision model and the decoder; the
    encoder then starts from the decoder's shared weights with a copy of its self-attention, and the
    ITC projections and ITM head stay randomly initialised. A filter folder
    (``BlipForImageTextRetrieval``) fills everything but the decoder's self-attention (copied from the
    encoder's) and its LM head transform and bias (random). A foreign folder keeps our default ITC temperature.
    """
    folder = _local(directory)
    architecture = _hf_architecture(folder, _read_config(folder))
    hf_config = HFBlipConfig.from_pretrained(str(folder))
    hf_model = HF_CLASSES[architecture].from_pretrained(str(folder), weights_only=True)
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
