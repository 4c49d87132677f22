"""Read the image bytes behind a manifest's `image_ref`.

An `image_ref` is either `<path>.tar#<key>` (a webdataset shard written by the download stage; the
member is `<key>.<ext>`) or a plain image file path; either may be a URI. Relative paths are relative to
the dataset folder (`<root>/<dataset>/`), so a dataset folder can be moved as a whole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import PurePosixPath

from vlp_core.storage import Location, is_absolute_ref, location, read_range, relative_ref, resolve_ref

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def rebased(rows: Iterable[dict], source_dir: Location, target_dir: Location) -> list[dict]:
    """The rows with each relative image_ref (relative to the dataset folder `source_dir`) made relative to
    the dataset folder `target_dir` (in the same store); absolute refs and missing ones are left as they are."""

    def rebase(image_ref: str | None) -> str | None:
        path, sep, key = (image_ref or "").partition("#")
        if not path or is_absolute_ref(path):
            return image_ref
        return relative_ref(location(source_dir) / path, location(target_dir)) + sep + key

    return [{**row, "image_ref": rebase(row["image_ref"])} for row in rows]


class ImageRefError(LookupError):
    """An image_ref points at nothing readable."""


class ShardUnavailableError(ImageRefError):
    """A whole tar shard is missing or unreadable: lost storage, not a bad image. A stage stops on it (and
    marks nothing done) instead of rejecting every image of the shard."""


class ImageStore:
    """Random access to the images of one dataset folder; tar shards are indexed once per store."""

    def __init__(self, dataset_dir: Location) -> None:
        self.dataset_dir = location(dataset_dir)
        self._tar_index = lru_cache(maxsize=64)(self._index_tar)

    def read(self, image_ref: str) -> bytes:
        """The encoded bytes of the image `image_ref` names."""
        path_part, _, key = image_ref.partition("#")
        path = resolve_ref(self.dataset_dir, path_part)
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
            data = read_range(path, member.offset_data, member.size)
        except OSError as error:
            raise ShardUnavailableError(f"{path}: shard unreadable at {key!r} ({error})") from None
        if len(data) != member.size:  # truncated after it was indexed
            raise ShardUnavailableError(f"{path}: shard unreadable at {key!r} (it ends inside that member)")
        return data

    @staticmethod
    def _index_tar(path: Location) -> dict[str, tarfile.TarInfo]:
        """key → image member of one tar shard."""
        try:
            with path.open("rb") as shard, tarfile.open(fileobj=shard) as tar:
                members = tar.getmembers()
                end_of_members = tar.offset
            _require_end_of_archive(path, end_of_members)
        except (OSError, tarfile.TarError) as error:
            raise ShardUnavailableError(
                f"{path}: shard missing or unreadable ({error}); restore it (or re-run the download) and run again"
            ) from None
        names = {m: PurePosixPath(m.name) for m in members if m.isfile()}
        return {name.stem: m for m, name in names.items() if name.suffix.lower() in IMAGE_EXTENSIONS}


def _require_end_of_archive(path: Location, offset: int) -> None:
    """A tar cut at a member boundary reads as a shorter archive; a whole one has its zero end block there."""
    block = read_range(path, offset, tarfile.BLOCKSIZE)
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"it ends without the end-of-archive block after byte {offset} (truncated)")
