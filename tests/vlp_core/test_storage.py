"""Locations in an object store (moto's S3 server on 127.0.0.1): the same reads and writes as on local paths,
with the guarantees an object store allows (vlp_core.storage, vlp_core.atomic)."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipelines.manifests.manifest import Generation, ManifestError
from vlp_core.atomic import atomic_directory, atomic_write_file, atomic_write_json, atomic_write_parquet
from vlp_core.checkpoint import load_checkpoint, save_checkpoint
from vlp_core.storage import (
    create_exclusive,
    is_absolute_ref,
    is_remote,
    local_copy,
    location,
    read_parquet,
    read_range,
    relative_ref,
    resolve_ref,
)


def test_a_location_is_a_path_or_a_uri(tmp_path: Path) -> None:
    assert location("runs/a") == Path("runs/a") and not is_remote(location("runs/a"))
    assert location(f"file://{tmp_path}") == tmp_path
    remote = location("s3://bucket/run")
    assert is_remote(remote) and str(remote / "web" / "gen-0000") == "s3://bucket/run/web/gen-0000"
    assert all(map(is_absolute_ref, ["/data/x.jpg", "s3://b/x.jpg"])) and not is_absolute_ref("web/x.tar")
    assert str(resolve_ref(remote / "web", "gen-0000/shards/0.tar")) == "s3://bucket/run/web/gen-0000/shards/0.tar"
    assert str(resolve_ref(remote, "gs://other/x.jpg")) == "gs://other/x.jpg"
    assert str(resolve_ref(remote / "ablate", "../web/x.tar")) == "s3://bucket/run/web/x.tar", "no '..' in a key"
    assert (
        relative_ref(remote / "web" / "gen-0000" / "shards" / "0.tar", remote / "ablate")
        == "../web/gen-0000/shards/0.tar"
    )
    with pytest.raises(ValueError, match="same store"):
        relative_ref(remote / "x", tmp_path)


def test_files_round_trip_through_a_bucket(bucket) -> None:
    table = pa.table({"a": [1, 2, 3]})
    assert read_parquet(atomic_write_parquet(table, bucket / "t.parquet")).equals(table)
    atomic_write_json(bucket / "deep" / "x.json", {"b": 1})
    assert (bucket / "deep" / "x.json").read_text() == '{\n  "b": 1\n}\n'

    def write(path: Path) -> None:
        path.write_bytes(b"pairs")

    path = atomic_write_file(bucket / "pairs.arrow", write, keep_if_same=True)
    first = path.fs.info(path.path)["LastModified"]
    atomic_write_file(path, write, keep_if_same=True)
    assert path.fs.info(path.path)["LastModified"] == first, "the same bytes are not written again"


def test_a_folder_in_a_bucket_replaces_the_old_one_with_its_commit_file_last(bucket, monkeypatch) -> None:
    folder = bucket / "checkpoint"
    with atomic_directory(folder, commit=("config.json",)) as staging:
        for name in ("config.json", "a.bin", "tokenizer/vocab.txt", "old.bin"):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(name)

    uploaded, put_file = [], folder.fs.put_file
    record = lambda lpath, rpath, **kw: uploaded.append(rpath) or put_file(lpath, rpath, **kw)  # noqa: E731
    monkeypatch.setattr(folder.fs, "put_file", record)
    with atomic_directory(folder, commit=("config.json",)) as staging:
        for name in ("config.json", "z.bin", "tokenizer/vocab.txt"):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(f"new {name}")
    assert uploaded[-1].endswith("checkpoint/config.json") and len(uploaded) == 3
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer", "z.bin"], "old files are gone"
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "new tokenizer/vocab.txt"

    with pytest.raises(RuntimeError), atomic_directory(bucket / "failed") as staging:
        (staging / "x").write_text("x")
        raise RuntimeError("cut off")
    assert not (bucket / "failed").exists(), "a block that fails uploads nothing"


def test_only_one_writer_creates_an_object(bucket) -> None:
    create_exclusive(bucket / "lock", b"first")
    with pytest.raises(FileExistsError):
        create_exclusive(bucket / "lock", b"second")
    assert (bucket / "lock").read_bytes() == b"first"


def test_a_second_writer_of_a_generation_in_a_bucket_is_refused(bucket, s3_env) -> None:
    generation = Generation(bucket / "manifests", "web", 1)
    second = (
        "from pipelines.manifests.manifest import Generation; from vlp_core.storage import location; "
        f"Generation(location({str(bucket / 'manifests')!r}), 'web', 1).writer('filter').__enter__()"
    )
    with generation.writer("caption"):
        out = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "is being written by caption" in out.stderr, out.stderr[-2000:]
    assert not (generation.path / "writer.lock").exists(), "the lock goes with its writer"
    with generation.writer("filter"):
        pass
    with pytest.raises(ManifestError, match="no parts"):
        generation.counts()


def test_a_checkpoint_in_a_bucket_loads_from_one_local_copy_per_content(bucket, small_blip, word_tokenizer, tmp_path):
    tokenizer = word_tokenizer(["a red cube", "a blue ball"])
    model = small_blip(tokenizer)
    local_digest = save_checkpoint(model, tokenizer, tmp_path / "local")
    assert save_checkpoint(model, tokenizer, bucket / "model") == local_digest

    loaded, _, digest = load_checkpoint(bucket / "model")
    assert digest == local_digest
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    copy = local_copy(bucket / "model")
    assert copy.name == "model" and local_copy(bucket / "model") == copy, "one copy per content"

    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    assert save_checkpoint(model, tokenizer, bucket / "model") != local_digest
    assert local_copy(bucket / "model") != copy, "new content, new copy"
    assert load_checkpoint(bucket / "model")[2] != local_digest


def test_a_ranged_read_in_a_bucket_reads_as_a_local_one(bucket, tmp_path: Path) -> None:
    data = bytes(range(100))
    local, remote = tmp_path / "f.bin", bucket / "f.bin"
    local.write_bytes(data)
    remote.write_bytes(data)
    for start, length in [(0, 10), (95, 10), (100, 512), (150, 1)]:
        assert read_range(remote, start, length) == read_range(local, start, length) == data[start : start + length]
