"""Atomic writes, for files and folders: write under a temporary name beside the target, then rename
it into place. A reader sees the old content, the new content or nothing, never a torn write.

Files are fsynced before the rename. Every module that writes something another process may read
(checkpoints, manifests, markers, reports) writes it through here.
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


def atomic_write_file(path: Path, write: Callable[[Path], None], keep_if_same: bool = False) -> Path:
    """Call `write(temporary_path)`, fsync what it wrote, and rename it to `path` (creating parent
    folders). For writers that take a path, such as safetensors' `save_file`. Returns `path`. A write that
    fails leaves nothing behind: neither the temporary file nor the folders it created. With `keep_if_same`,
    an existing `path` with the same bytes is left as it is (a re-run does not touch it)."""
    path = Path(path)
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


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically. Returns `path`."""
    return atomic_write_file(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_parquet(table: pa.Table, path: Path) -> Path:
    """Write an Arrow table as one zstd-compressed Parquet file at `path` atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `directory` that replaces it once the block succeeds (an
    existing `directory` is renamed away first and removed after); on an error the staging folder goes."""
    target = Path(directory)
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
