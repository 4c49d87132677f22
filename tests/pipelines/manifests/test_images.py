import io
import tarfile

import pytest

from pipelines.manifests.images import ImageRefError, ImageStore, ShardUnavailableError


def _shard(count: int = 4, size: int = 1000) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(count):
            member = tarfile.TarInfo(f"{index:06d}.jpg")
            member.size = size
            tar.addfile(member, io.BytesIO(bytes([index]) * size))
    return buffer.getvalue()


def test_reads_members_of_a_whole_shard_and_names_a_missing_key(tmp_path):
    (tmp_path / "00000.tar").write_bytes(_shard())
    store = ImageStore(tmp_path)
    assert store.read("00000.tar#000002") == bytes([2]) * 1000
    with pytest.raises(ImageRefError, match="no image with key '000009'") as caught:
        store.read("00000.tar#000009")
    assert not isinstance(caught.value, ShardUnavailableError)


def test_a_shard_cut_anywhere_is_unavailable_not_shorter(tmp_path):
    """A cut on a member boundary parses as a smaller archive; only the missing end block tells it apart."""
    whole = _shard()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        tar.getmembers()
        members_end = tar.offset
    cuts = range(tarfile.BLOCKSIZE, members_end + 1, tarfile.BLOCKSIZE)
    assert len(cuts) >= 8
    for cut in cuts:
        (tmp_path / f"{cut}.tar").write_bytes(whole[:cut])
        with pytest.raises(ShardUnavailableError, match=f"{cut}.tar: shard missing or unreadable"):
            ImageStore(tmp_path).read(f"{cut}.tar#000000")
