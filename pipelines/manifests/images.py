"""Read the image bytes behind a manifest's `image_ref`.

An `image_ref` is either `<path>.tar#<key>` (a webdataset shard written by the download stage; the
member is `<key>.<ext>`) or a plain image file path. Relative paths are relative to the dataset folder
(`<root>/<dataset>/`), so a dataset folder can be moved as a whole.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def rebased(rows: Iterable[dict], source_dir: Path, target_dir: Path) -> list[dict]:
    """The rows with each relative image_ref (relative to the dataset folder `source_dir`) made relative to
    the dataset folder `target_dir`; absolute refs and missing ones are left as they are."""

    def rebase(image_ref: str | None) -> str | None:
        path, sep, key = (image_ref or "").partition("#")
        if not path or Path(path).is_absolute():
            return image_ref
        return os.path.relpath(Path(source_dir) / path, target_dir) + sep + key

    return [{**row, "image_ref": rebase(row["image_ref"])} for row in rows]


class ImageRefError(LookupError):
    """An image_ref points at nothing readable."""


class ShardUnavailableError(ImageRefError):
    """A whole tar shard is missing or unreadable: lost storage, not a bad image. A stage stops on it (and
    marks nothing done) instead of rejecting every image of the shard."""


class ImageStore:
    """Random access to the images of one dataset folder; tar shards are indexed once per store."""

    def __init__(self, dataset_dir: Path) -> None:
        self.dataset_dir = Path(dataset_dir)
        self._tar_index = lru_cache(maxsize=64)(self._index_tar)

    def read(self, image_ref: str) -> bytes:
        """The encoded bytes of the image `image_ref` names."""
        path_part, _, key = image_ref.partition("#")
        path = self._resolve(path_part)
        if not key:
            try:
                return path.read_bytes()
            except OSError as error:
                raise ImageRefError(f"image_ref {image_ref!r}: cannot read {path} ({error.strerror})") from None
        members = self._tar_index(path)
        member = members.get(key)
        if member is None:
            raise ImageRefError(f"image_ref {image_ref!r}: no image with key {key!r} in {path}")
        try:
            with tarfile.open(path) as tar:
                return tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as error:  # truncated after it was indexed
            raise ShardUnavailableError(f"{path}: shard unreadable at {key!r} ({error})") from None

    def _resolve(self, path_part: str) -> Path:
        path = Path(path_part)
        return path if path.is_absolute() else self.dataset_dir / path

    @staticmethod
    def _index_tar(path: Path) -> dict[str, tarfile.TarInfo]:
        """key → image member of one tar shard."""
        try:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                end_of_members = tar.offset
            _require_end_of_archive(path, end_of_members)
        except (OSError, tarfile.TarError) as error:
            raise ShardUnavailableError(
                f"{path}: shard missing or unreadable ({error}); restore it (or re-run the download) and run again"
            ) from None
        return {Path(m.name).stem: m for m in members if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS}


def _require_end_of_archive(path: Path, offset: int) -> None:
    """A tar cut at a member boundary reads as a shorter archive; a whole one has its zero end block there."""
    with path.open("rb") as file:
        file.seek(offset)
        block = file.read(tarfile.BLOCKSIZE)
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"it ends without the end-of-archive block after byte {offset} (truncated)")
