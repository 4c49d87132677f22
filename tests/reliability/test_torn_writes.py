"""Atomic writes: a reader sees the old file or the new one, never a torn one, even across SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlp_core.atomic import atomic_write_bytes

SIZE = 4 * 2**20  # big enough that a plain write would be caught half-done


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "part-00000.parquet"
    atomic_write_bytes(target, b"old")

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_writer_killed_at_any_moment_never_leaves_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "part-00000.parquet"
    code = (
        "import itertools, sys\n"
        "from vlp_core.atomic import atomic_write_bytes\n"
        "for i in itertools.count():\n"
        f"    atomic_write_bytes(sys.argv[1], bytes([i % 251]) * {SIZE})\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)])
    seen = set()
    try:
        while len(seen) < 5:  # read while it rewrites the file, then kill it mid-write
            if target.exists():
                data = target.read_bytes()
                assert len(data) == SIZE and data.count(data[:1]) == SIZE, "a torn file was visible"
                seen.add(data[0])
            assert writer.poll() is None
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    data = target.read_bytes()
    assert len(data) == SIZE and data.count(data[:1]) == SIZE
    assert [p.name for p in tmp_path.glob("part-*.parquet")] == [target.name]  # temp names start with "."
