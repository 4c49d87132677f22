"""Atomic writes, for files and folders: a reader sees the old content, the new content or nothing,
never a torn write. Every module that writes something another process may read (checkpoints, manifests,
markers, reports) writes it through here.

On a local or shared filesystem a file or folder is written under a temporary name beside its target,
fsynced, and renamed into place. In an object store (a remote `Location`, see `vlp_core.storage`) a file
is put as one object, which appears whole; a folder is staged locally and uploaded with its commit files
last (`atomic_directory(..., commit=...)`).
"""

from __future__ import annotations

import filecmp
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.storage import Location, is_remote, location, upload_folder


def atomic_write_file(path: Location, write: Callable[[Path], None], keep_if_same: bool = False) -> Location:
    """Call `write(temporary_path)`, fsync what it wrote, and rename it to `path` (creating parent
    folders). For writers that take a path, such as safetensors' `save_file`. Returns `path`. A write that
    fails leaves nothing behind: neither the temporary file nor the folders it created. With `keep_if_same`,
    an existing `path` with the same bytes is left as it is (a re-run does not touch it). A remote `path` is
    written in a local temporary folder, then put as one object."""
    path = location(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="capfilt-") as staging:
            temporary = Path(staging) / path.name
            write(temporary)
            data = temporary.read_bytes()
            if not (keep_if_same and path.is_file() and path.read_bytes() == data):
                path.write_bytes(data)
        return path
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        if keep_if_same and path.is_file() and filecmp.cmp(temporary, path, shallow=False):
            temporary.unlink()
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        for folder in made:
            if not any(folder.iterdir()):
                folder.rmdir()
        raise
    return path


def atomic_write_bytes(path: Location, data: bytes) -> Location:
    """Write `data` to `path` atomically. Returns `path`."""
    path = location(path)
    if is_remote(path):
        path.write_bytes(data)  # one object: it appears whole
        return path
    return atomic_write_file(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: Location, text: str) -> Location:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Location, obj: Any) -> Location:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_parquet(table: pa.Table, path: Location) -> Location:
    """Write an Arrow table as one zstd-compressed Parquet file at `path` atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def atomic_directory(directory: Location, commit: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `directory` once the block succeeds; on an error the
    staging folder goes. Locally it is beside `directory` and renamed into place (an existing `directory`
    is renamed away first and removed after). For a remote `directory` it is a local temporary folder,
    uploaded file by file with the `commit` files (relative names) last: readers of a remote folder look
    for one of those."""
    directory = location(directory)
    if is_remote(directory):
        with tempfile.TemporaryDirectory(prefix="capfilt-") as staging:
            yield Path(staging)
            upload_folder(Path(staging), directory, last=commit)
        return
    target = directory
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)
