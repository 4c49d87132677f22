"""Atomic file writes: write to a temporary name in the same folder, fsync, rename into place.

A reader never sees a half-written file: either the old content, the new content, or nothing.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (creating parent folders). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_parquet(table: pa.Table, path: Path) -> Path:
    """Write an Arrow table as one Parquet file at `path` atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return atomic_write_bytes(path, buffer.getvalue())
