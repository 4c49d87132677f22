"""Where capfilt reads and writes: local paths and URIs (``s3://``, ``gs://``, ...) behind one path type.

:func:`location` turns a user's argument into a :data:`Location`: a ``pathlib.Path`` for a local path, an
fsspec ``UPath`` for a URI. Both have the pathlib methods capfilt uses (``/``, ``open``, ``read_bytes``,
``exists``, ``glob``, ``iterdir``, ``name``, ``parent``), so every reader and writer is written once for both.
Credentials come from the store's usual environment (``AWS_*`` variables, fsspec's config, an instance
role), never from the URI, so they never reach a manifest or a log.

What each kind of store guarantees, and how capfilt keeps its write rules on it:

- a local or shared filesystem renames atomically: a file or folder is written under a temporary name
  beside its target and renamed into place (``vlp_core.atomic``);
- an object store (S3, GCS, ...) has no rename, but an object appears whole or not at all: a file is
  written as one object, and a folder file by file with its commit file (e.g. a checkpoint's
  ``config.json``) last, so a reader that finds the commit file finds the rest; the writer lock is an
  object created only where none exists (a conditional write, :func:`create_exclusive`).

Libraries that want real files (safetensors, transformers, open_clip, tokenizers) get a local copy of a
remote file or folder (:func:`local_copy`), kept in a cache under a key of its listing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

Location: TypeAlias = Path | UPath
CACHE_ENV = "CAPFILT_CACHE"  # where local copies of remote folders are kept (default ~/.cache/capfilt)


def location(value: str | os.PathLike | UPath) -> Location:
    """A local path as a ``pathlib.Path``; a URI (``scheme://...``) as a ``UPath``; ``file://`` URIs are local."""
    if isinstance(value, Path):
        return value
    text = str(value)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:  # no cached listings: the files other processes (actors, workers) write must show
        return UPath(text, use_listings_cache=False)
    return Path(text)


def is_remote(path: Location) -> bool:
    """Whether `path` is in a store reached through fsspec rather than the local filesystem."""
    return not isinstance(path, Path)


def absolute(path: Location) -> Location:
    """The absolute form of a local path (a URI is absolute already)."""
    return path if is_remote(path) else path.resolve()


def is_absolute_ref(ref: str) -> bool:
    """Whether a stored reference (an image_ref's path part, a file name in an annotation file) is absolute:
    a URI or an absolute local path, not relative to a folder."""
    return "://" in ref or Path(ref).is_absolute()


def resolve_ref(base: Location, ref: str) -> Location:
    """`ref` as a location: itself when absolute, else relative to the folder `base` (`..` steps taken: an
    object store has no folders to climb, so `bucket/ablate/../web` would be a key of its own)."""
    if is_absolute_ref(ref):
        return location(ref)
    joined = base / ref
    return location(f"{joined.protocol}://{posixpath.normpath(joined.path)}") if is_remote(joined) else joined


def relative_ref(target: Location, start: Location) -> str:
    """The reference from folder `start` to `target` (both local, or both in one store)."""
    if is_remote(target) != is_remote(start):
        raise ValueError(f"{target} and {start} are not in the same store")
    if is_remote(target):
        return posixpath.relpath(posixpath.normpath(target.path), posixpath.normpath(start.path))
    return os.path.relpath(target, start)


def read_parquet(path: Location, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file (only `columns`, when given), local or remote."""
    with path.open("rb") as stream:
        return pq.read_table(stream, columns=columns)


def read_range(path: Location, start: int, length: int) -> bytes:
    """`length` bytes of a file from byte `start` (fewer at its end, none past it): one ranged GET in an
    object store."""
    if is_remote(path):
        try:
            return path.fs.cat_file(path.path, start=start, end=start + length)
        except OSError as error:
            if error.errno == errno.EINVAL:  # S3's "range not satisfiable": `start` is past the end
                return b""
            raise
    with path.open("rb") as stream:
        stream.seek(start)
        return stream.read(length)


def create_exclusive(path: Location, data: bytes) -> None:
    """Create `path` holding `data` only if nothing is there: FileExistsError otherwise. The file appears
    whole. Locally a hard link of a written claim file; in an object store a conditional write."""
    if is_remote(path):
        with path.open("xb") as stream:
            stream.write(data)
        return
    claim = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    claim.write_bytes(data)
    try:
        os.link(claim, path)
    finally:
        claim.unlink(missing_ok=True)


def upload_folder(local: Path, remote: Location, last: tuple[str, ...] = ()) -> None:
    """Copy the files of `local` to the folder `remote` (its old files removed first), the files named in
    `last` (relative names) after every other one, so that a reader who finds them finds the rest."""
    if remote.exists():
        remote.fs.rm(remote.path, recursive=True)
    names = sorted(str(path.relative_to(local)) for path in local.rglob("*") if path.is_file())
    for name in sorted(names, key=lambda name: name in last):
        remote.fs.put_file(str(local / name), (remote / name).path)


def local_copy(source: Location) -> Path:
    """A local file or folder with the content of `source`: `source` itself when local; for a remote one a
    copy in the cache, made once per content (its key is the URI and its files' names, sizes and ETags or
    modification times), under its own name, which some loaders read."""
    if not is_remote(source):
        return source
    listing = source.fs.find(source.path, detail=True)
    if not listing:
        raise FileNotFoundError(f"{source}: no such file or folder")
    key = hashlib.sha256(str(source).encode())
    for name, info in sorted(listing.items()):
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        key.update(f"\x1f{name}\x1f{info.get('size')}\x1f{version}".encode())
    copies = cache_dir() / "copies"
    copy = copies / key.hexdigest()[:16] / source.name
    if copy.exists():
        return copy
    copies.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=copies))
    try:
        for name in listing:
            target = staging / source.name / posixpath.relpath(name, source.path)  # a file's is "."
            target.parent.mkdir(parents=True, exist_ok=True)
            source.fs.get_file(name, str(target))
        os.replace(staging, copy.parent)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not copy.exists():  # another process made the same copy first: use it
            raise
    return copy


def cache_dir() -> Path:
    """capfilt's local cache: `$CAPFILT_CACHE`, else ~/.cache/capfilt."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "capfilt")
