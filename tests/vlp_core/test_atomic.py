"""vlp_core.atomic: a folder is replaced whole or not at all."""

import pytest

from vlp_core.atomic import atomic_directory


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
