"""Training data: (image, caption) pairs from a generation or a COCO set, and a reproducible batch order.

A pair's image is read through `ImageStore` (a webdataset shard member or a file). Batches are a pure
function of (seed, epoch, position): the shuffle comes from a generator seeded with (seed, epoch) and
every item's random crop from its own seed, so neither the number of loader workers nor a resume
in the middle of an epoch changes what the model sees.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation, ManifestError
from vlp_core.data import load_coco_karpathy, load_image, normalize_caption

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 512  # longer captions are cut at a word boundary; the tokenizer truncates further


@dataclass(frozen=True)
class Pair:
    """One training pair. `image_index` numbers distinct images: equal indices are ITC positives."""

    image_ref: str
    caption: str
    image_index: int


def generation_pairs(generation: Generation) -> list[Pair]:
    """The kept pairs of a generation, captions cleaned; `image_ref`s are relative to its dataset folder."""
    table = generation.read_samples().filter(pc.field("kept"))
    rows = table.select(["image_id", "image_ref", "caption"]).to_pylist()
    missing = [row["image_id"] for row in rows if row["image_ref"] is None]
    if missing:
        raise ManifestError(
            f"{generation.path}: {len(missing)} kept rows have no image_ref (e.g. {missing[0]}); "
            "a kept row must point at its image"
        )
    return _pairs([(row["image_id"], row["image_ref"], row["caption"]) for row in rows], str(generation.path))


def coco_pairs(annotations: Path, image_root: Path) -> list[Pair]:
    """One pair per caption of a COCO Karpathy annotation file; `image_ref`s are absolute paths."""
    records = load_coco_karpathy(annotations, Path(image_root).resolve())
    triples = [(record.image_id, str(record.image_path), caption) for record in records for caption in record.captions]
    return _pairs(triples, str(annotations))


def _pairs(triples: list[tuple[str, str, str | None]], source: str) -> list[Pair]:
    """(image_id, image_ref, caption) → Pairs with cleaned captions; captions that clean to nothing are dropped."""
    image_index = {image_id: i for i, image_id in enumerate(sorted({image_id for image_id, _, _ in triples}))}
    pairs = []
    for image_id, image_ref, caption in triples:
        cleaned, _ = normalize_caption(caption or "", MAX_CAPTION_CHARS)
        if cleaned is not None:
            pairs.append(Pair(image_ref, cleaned, image_index[image_id]))
    if len(pairs) < len(triples):
        log.info(
            "%s: %d of %d captions are empty after cleaning and are not trained on",
            source,
            len(triples) - len(pairs),
            len(triples),
        )
    if not pairs:
        raise ValueError(f"{source}: no training pairs (no kept rows with a non-empty caption)")
    return pairs


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from `parts` (e.g. (seed, epoch)); different parts give unrelated seeds."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def epoch_order(
    n_pairs: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> list[tuple[int, int]]:
    """This rank's (pair index, item seed) for one epoch: a shuffle shared by all ranks, dealt round-robin,
    cut to whole batches. Every rank gets the same number of batches."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()
    per_rank = n_pairs // world_size // batch_size * batch_size
    item_seed = derive_seed(seed, epoch, "items")
    return [(index, (item_seed + index) % 2**63) for index in order[rank::world_size][:per_rank]]


class PairDataset(Dataset):
    """Key (pair index, item seed) → (image (3, S, S), prefix + caption, image_index).

    The item seed fixes the transform's randomness (the training crop) for that item.
    """

    def __init__(
        self,
        pairs: list[Pair],
        image_dir: Path,
        transform: Callable[[Image.Image], torch.Tensor],
        caption_prefix: str = "",
    ) -> None:
        self.pairs = pairs
        self.store = ImageStore(image_dir)
        self.transform = transform
        self.caption_prefix = caption_prefix

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        index, seed = key
        pair = self.pairs[index]
        image = load_image(self.store.read(pair.image_ref))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        return pixels, self.caption_prefix + pair.caption, pair.image_index


def collate_captions(batch: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor | list[str]]:
    """Stack images and keep captions as text (for models with their own tokenizer, e.g. open_clip):
    pixel_values (B, 3, S, S), captions (B strings), image_index (B,)."""
    images, captions, image_index = zip(*batch)
    return {
        "pixel_values": torch.stack(images),
        "captions": list(captions),
        "image_index": torch.tensor(image_index, dtype=torch.long),
    }
