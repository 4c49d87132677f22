"""vlp_core.atomic: a folder or a file is replaced whole or not at all."""

import pytest

from vlp_core.atomic import atomic_directory, atomic_write_file


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "target"
    with atomic_directory(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [path.name for path in target.iterdir()] == ["old.txt"]
    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [path.name for path in target.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["target"]


def test_a_failed_file_write_removes_the_folders_it_made_and_the_same_bytes_keep_the_old_file(tmp_path):
    def fail(temporary):
        temporary.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_file(tmp_path / "a" / "b" / "file.bin", fail)
    assert list(tmp_path.iterdir()) == []

    path = atomic_write_file(tmp_path / "file.bin", lambda temporary: temporary.write_bytes(b"same"))
    before = path.stat().st_ino
    atomic_write_file(path, lambda temporary: temporary.write_bytes(b"same"), keep_if_same=True)
    assert path.stat().st_ino == before and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write_file(path, lambda temporary: temporary.write_bytes(b"diff"), keep_if_same=True)
    assert path.stat().st_ino != before and path.read_bytes() == b"diff"
