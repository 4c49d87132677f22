"""Training data: (image, caption) pairs from a generation or a COCO set, and a reproducible batch order.

The pairs of a run are written once, streamed from their source, into an Arrow IPC file in the run folder
(`PAIR_FILE`); workers read it one small record batch per pair, so none holds (or maps) the pairs and a
generation of any size trains with the same footprint. A pair's image is read through `ImageStore` (a
webdataset shard member or a file). Batches are a pure function of (seed, epoch, position): the shuffle
is a keyed permutation computed one position at a time (`Permutation`), and every item's random crop
comes from its own seed, so neither the number of loader workers nor a resume in the middle of an epoch
changes what the model sees.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation, ManifestError
from vlp_core.atomic import atomic_write_file
from vlp_core.data import load_coco_karpathy, load_image, normalize_caption
from vlp_core.storage import Location, absolute, local_copy, location

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 512  # longer captions are cut at a word boundary; the tokenizer truncates further
PAIR_FILE = "pairs.arrow"
PAIR_SCHEMA = pa.schema([("image_ref", pa.string()), ("caption", pa.string()), ("image_key", pa.int64())])
PAIR_BATCH_ROWS = 1024  # rows per record batch of a pair file (the last one may be shorter): one read per pair


@dataclass(frozen=True)
class Pair:
    """One training pair. `image_key` names its image: equal keys are ITC positives."""

    image_ref: str
    caption: str
    image_key: int


def image_key(image_id: str) -> int:
    """A 63-bit key of an image id (non-negative: the ITC queue marks empty slots with -1)."""
    return derive_seed("image", image_id)


def generation_triples(generation: Generation) -> Iterator[tuple[str, str, str | None]]:
    """(image_id, image_ref, caption) of every kept row, part by part; `image_ref`s are relative to the
    generation's dataset folder."""
    for part in generation.iter_parts(["image_id", "image_ref", "caption", "kept"]):
        kept = part.filter(part["kept"])
        missing = kept.filter(pc.is_null(kept["image_ref"]))
        if missing.num_rows:
            raise ManifestError(
                f"{generation.path}: {missing.num_rows} kept rows have no image_ref (e.g. "
                f"{missing['image_id'][0].as_py()}); a kept row must point at its image"
            )
        yield from zip(*(kept[name].to_pylist() for name in ("image_id", "image_ref", "caption")))


def coco_triples(annotations: Location, image_root: Location) -> Iterator[tuple[str, str, str]]:
    """(image_id, absolute image path, caption) for every caption of a COCO Karpathy annotation file."""
    for record in load_coco_karpathy(annotations, absolute(location(image_root))):
        for caption in record.captions:
            yield record.image_id, str(record.image_path), caption


def write_pairs(triples: Iterable[tuple[str, str, str | None]], path: Location, source: str) -> PairFile:
    """Clean the captions of (image_id, image_ref, caption) triples and write the pairs to `path`
    (atomically, in batches: memory is one batch; an existing file with the same pairs is kept); captions
    that clean to nothing are dropped."""
    counts = {"read": 0, "written": 0}

    def write(temporary: Path) -> None:
        with pa.ipc.new_file(str(temporary), PAIR_SCHEMA) as writer:
            batch: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
            for image_id, image_ref, caption in triples:
                counts["read"] += 1
                cleaned, _ = normalize_caption(caption or "", MAX_CAPTION_CHARS)
                if cleaned is None:
                    continue
                for name, value in zip(PAIR_SCHEMA.names, (image_ref, cleaned, image_key(image_id))):
                    batch[name].append(value)
                if len(batch["caption"]) == PAIR_BATCH_ROWS:
                    counts["written"] += _write_batch(writer, batch)
            counts["written"] += _write_batch(writer, batch)

    atomic_write_file(path, write, keep_if_same=True)  # a re-run of the same data leaves the file untouched
    if counts["written"] < counts["read"]:
        log.info(
            "%s: %d of %d captions are empty after cleaning and are not trained on",
            source,
            counts["read"] - counts["written"],
            counts["read"],
        )
    if not counts["written"]:
        raise ValueError(f"{source}: no training pairs (no kept rows with a non-empty caption)")
    return PairFile(path)


def _write_batch(writer: pa.ipc.RecordBatchFileWriter, batch: dict[str, list]) -> int:
    """Write and empty `batch`; returns its number of rows."""
    rows = len(batch["caption"])
    if rows:
        writer.write_batch(pa.record_batch([pa.array(batch[f.name], f.type) for f in PAIR_SCHEMA], PAIR_SCHEMA))
        for values in batch.values():
            values.clear()
    return rows


class PairFile:
    """The pairs in a file `write_pairs` wrote, read one record batch (PAIR_BATCH_ROWS pairs) per access
    with plain reads: no process holds or maps the whole file. Opened lazily, so a copy sent to another
    process (a loader or Ray worker) opens its own."""

    def __init__(self, path: Location) -> None:
        self.path = location(path)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]

    @cached_property
    def _reader(self) -> pa.ipc.RecordBatchFileReader:
        return pa.ipc.open_file(pa.OSFile(str(local_copy(self.path))))  # a remote file: read from a local copy

    @cached_property
    def _length(self) -> int:
        last = self._reader.num_record_batches - 1
        return last * PAIR_BATCH_ROWS + self._reader.get_batch(last).num_rows if last >= 0 else 0

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Pair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        batch, row = divmod(index, PAIR_BATCH_ROWS)
        image_ref, caption, key = (column[row].as_py() for column in self._reader.get_batch(batch).columns)
        return Pair(image_ref, caption, key)

    def captions(self) -> Iterator[str]:
        """Every caption, in file order, one batch at a time."""
        for index in range(self._reader.num_record_batches):
            yield from self._reader.get_batch(index).column("caption").to_pylist()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from `parts` (e.g. (seed, epoch)); different parts give unrelated seeds."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random permutation of range(n) keyed by `seed`, computed one position at a time in O(1)
    memory: a 4-round Feistel network on the smallest even number of bits that holds n, walking the cycle
    until it lands back in range (fewer than 4 steps on average)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [derive_seed(seed, "round", r) for r in range(self.ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} of {self.n}")
        x = position
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


@dataclass(frozen=True)
class EpochOrder:
    """One rank's (pair index, item seed) for one epoch, from position `start` on: one shuffle shared by
    all ranks (`Permutation` of (seed, epoch)), dealt round-robin and cut to whole batches, so every rank
    gets the same number of batches. Computed as it is iterated; use it as a DataLoader sampler."""

    n_pairs: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    start: int = 0

    @property
    def per_rank(self) -> int:
        return self.n_pairs // self.world_size // self.batch_size * self.batch_size

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shuffle = Permutation(self.n_pairs, derive_seed(self.seed, self.epoch))
        item_seed = derive_seed(self.seed, self.epoch, "items")
        for position in range(self.start, self.per_rank):
            index = shuffle[position * self.world_size + self.rank]
            yield index, (item_seed + index) % 2**63


class PairDataset(Dataset):
    """Key (pair index, item seed) → (image (3, S, S), prefix + caption, image key).

    The item seed fixes the transform's randomness (the training crop) for that item.
    """

    def __init__(
        self,
        pairs: PairFile,
        image_dir: Location,
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
            # the CPU generator only: torch.manual_seed would also seed (or, before CUDA starts, queue a seed
            # with a stack trace for) every accelerator's generator, unrestored by fork_rng(devices=[])
            torch.default_generator.manual_seed(seed)
            pixels = self.transform(image)
        return pixels, self.caption_prefix + pair.caption, pair.image_key


def collate_captions(batch: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor | list[str]]:
    """Stack images and keep captions as text (for models with their own tokenizer, e.g. open_clip):
    pixel_values (B, 3, S, S), captions (B strings), image_index (B,)."""
    images, captions, image_index = zip(*batch)
    return {
        "pixel_values": torch.stack(images),
        "captions": list(captions),
        "image_index": torch.tensor(image_index, dtype=torch.long),
    }
