"""Data in, tensors out: image transforms, caption cleaning, COCO-Karpathy sets (decoding: vlp_core.decode).

Every function here is deterministic except the training-time random crop, and every failure
carries a short machine-usable reason that the pipeline records in its manifests.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlp_core.config import DEFAULT_MIN_CROP_AREA
from vlp_core.decode import DECODE_REASONS, DEFAULT_MAX_PIXELS, ImageDecodeError, load_image  # noqa: F401 (the decoder's names stay importable from here)
from vlp_core.storage import Location, location
from vlp_core.tokenizer import tokenize

if TYPE_CHECKING:
    from vlp_core.config import BlipConfig

# --------------------------------------------------------------------------- images

PixelTransform = Callable[[Image.Image], torch.Tensor]  # an image -> (3, S, S), as a model reads it


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised float tensor (3, S, S), S = config.vision.image_size.

    Training adds a light random resized crop (`min_crop_area` to 100 % of the area; none at 1.0).
    There is deliberately no horizontal flip: captions say "left of" / "right of", and a flip would make
    them false.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool = False
    min_crop_area: float = DEFAULT_MIN_CROP_AREA

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.train and self.min_crop_area < 1.0:
            image = image.crop(self._random_crop_box(*image.size))
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def _random_crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A box covering about [min_crop_area, 1] of the image; its aspect is the image's times [3/4, 4/3]."""
        area_fraction, log_aspect, left_fraction, top_fraction = torch.rand(4).tolist()
        area = self.min_crop_area + (1 - self.min_crop_area) * area_fraction
        aspect = math.exp(math.log(3 / 4) + log_aspect * math.log(16 / 9))
        crop_w = min(width, max(1, round(width * math.sqrt(area * aspect))))
        crop_h = min(height, max(1, round(height * math.sqrt(area / aspect))))
        left = round(left_fraction * (width - crop_w))
        top = round(top_fraction * (height - crop_h))
        return left, top, left + crop_w, top + crop_h


def image_transform(config: BlipConfig, train: bool) -> ImageTransform:
    """The model's image transform: resize to the configured size and normalise (see ImageTransform)."""
    return ImageTransform(
        image_size=config.vision.image_size,
        mean=tuple(config.image_mean),
        std=tuple(config.image_std),
        train=train,
        min_crop_area=config.min_crop_area,
    )


# --------------------------------------------------------------------------- captions

_HTML_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z!][^<>]*>", re.DOTALL)  # "a < b > c" is not a tag


def normalize_caption(text: str | bytes, max_chars: int) -> tuple[str | None, str | None]:
    """Clean one web caption. Returns (caption, reason).

    Invalid UTF-8 is decoded with replacement and flagged: ("repaired text", "invalid_utf8").
    A caption with nothing left is rejected: (None, "empty_caption"). Otherwise (caption, None).
    Cleaning strips HTML tags and entities, control/format characters and U+FFFD, applies NFC,
    collapses whitespace and cuts to at most `max_chars` characters at a word boundary.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    flag = None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text, flag = text.decode("utf-8", errors="replace"), "invalid_utf8"
    previous = None
    while text != previous:  # entities can hide tags ("&lt;b&gt;"), so repeat until stable
        previous = text
        text = unicodedata.normalize("NFC", _HTML_TAG.sub(" ", html.unescape(_drop_control(text))))
    text = _truncate_at_word(" ".join(text.split()), max_chars)
    if not text:
        return None, "empty_caption"
    return text, flag


def _drop_control(text: str) -> str:
    """Whitespace-like control characters become spaces; other control/format/unassigned go."""
    return "".join(
        " " if char.isspace() else char
        for char in text
        if char.isspace() or (unicodedata.category(char)[0] != "C" and char != "\ufffd")
    )


def _truncate_at_word(text: str, max_chars: int) -> str:
    """Cut `text` to at most max_chars, preferring to drop a partial last word."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if text[max_chars] != " " and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip()


# --------------------------------------------------------------------------- COCO Karpathy


class CocoFormatError(ValueError):
    """An annotation file that does not follow the COCO Karpathy format."""


@dataclass(frozen=True)
class CaptionRecord:
    """One image and all of its captions."""

    image_path: Location  # a local path or a URI
    captions: tuple[str, ...]
    image_id: str


def load_coco_karpathy(annotation_json: Location, image_root: Location) -> list[CaptionRecord]:
    """Read `[{"image": str, "caption": str | [str], "image_id": ...}, ...]` into one record per image.

    Entries that share an image are merged (the Karpathy train split has one entry per caption).
    `image_id` is optional; without it the image path stands in. Refused, with the file and entry named:
    an empty list, an image path that leaves `image_root` (absolute or with `..`), one image under two
    ids and one id for two images. Empty captions are returned; their users record them as rejected.
    """
    annotation_json = location(annotation_json)
    try:
        entries = json.loads(annotation_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{annotation_json}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise CocoFormatError(
            f"{annotation_json}: not UTF-8 (byte {error.start} is {error.object[error.start : error.start + 1]!r}); "
            "save it as UTF-8, as JSON requires"
        ) from error
    if not isinstance(entries, list):
        raise CocoFormatError(f"{annotation_json}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise CocoFormatError(f"{annotation_json}: the list of entries is empty")
    captions: dict[str, list[str]] = {}
    image_ids: dict[str, str] = {}
    images: dict[str, str] = {}  # image_id -> image
    for index, entry in enumerate(entries):
        where = f"{annotation_json}: entry {index}"
        image, entry_captions, image_id = _parse_entry(entry, where)
        if image_ids.setdefault(image, image_id) != image_id:
            raise CocoFormatError(
                f"{where}: image {image!r} has image_id {image_id!r}, but an earlier entry gave it {image_ids[image]!r}"
            )
        if images.setdefault(image_id, image) != image:
            raise CocoFormatError(
                f"{where}: image_id {image_id!r} names image {image!r}, but an earlier entry gave it to "
                f"{images[image_id]!r}; every image needs its own id"
            )
        captions.setdefault(image, []).extend(entry_captions)
    return [
        CaptionRecord(location(image_root) / image, tuple(texts), image_ids[image]) for image, texts in captions.items()
    ]


def _parse_entry(entry: object, where: str) -> tuple[str, list[str], str]:
    """Validate one annotation entry; returns (image, captions, image_id)."""
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise CocoFormatError(f"{where}: field 'image' must be a non-empty string (a path under the image root)")
    if _leaves_root(image):
        raise CocoFormatError(f"{where}: image {image!r} must be a relative path that stays under the image root")
    caption = entry.get("caption")
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise CocoFormatError(f"{where}: field 'caption' must be a string or a non-empty list of strings")
    image_id = entry.get("image_id", image)
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
        raise CocoFormatError(f"{where}: field 'image_id' must be a string or an integer")
    return image, captions, str(image_id)


def _leaves_root(relative: str) -> bool:
    """Whether a path meant to be relative is a URI, absolute, or climbs with `..` (POSIX or Windows spelling)."""
    paths = (PurePosixPath(relative), PureWindowsPath(relative))
    return "://" in relative or any(path.is_absolute() or path.anchor or ".." in path.parts for path in paths)


class CocoCaptionSet(Dataset):
    """(image tensor (3,S,S), caption, image index) for every caption of every record.

    The image index (position of the record) lets a loss treat captions of one image as positives.
    """

    def __init__(self, records: list[CaptionRecord], transform: ImageTransform):
        self.records = records
        self.transform = transform
        self.pairs = [(r, c) for r, record in enumerate(records) for c in range(len(record.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        record_index, caption_index = self.pairs[index]
        record = self.records[record_index]
        image = self.transform(load_image(record.image_path))
        return image, record.captions[caption_index], record_index


@dataclass(frozen=True)
class CaptionCollator:
    """Stack a list of CocoCaptionSet items into a batch dict (picklable for DataLoader workers).

    Returns pixel_values (B,3,S,S), input_ids / attention_mask (B,L) as `tokenize` makes them
    ([CLS] ... [SEP], right padded) and image_index (B,).
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, batch: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
        images, captions, image_index = zip(*batch)
        input_ids, attention_mask = tokenize(self.tokenizer, list(captions), self.max_length)
        return {
            "pixel_values": torch.stack(images),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_index": torch.tensor(image_index, dtype=torch.long),
        }
