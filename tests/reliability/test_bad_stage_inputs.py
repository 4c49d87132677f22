"""Bad manifests, annotation files and config values through the `capfilt` command: a clear error that
names the file and what is wrong, exit code 2, and nothing written."""

import gzip
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from pipelines.manifests.manifest import SCHEMA_VERSION_KEY, Generation, ManifestError, manifest_digest, samples_table
from pipelines.stages.download import DownloadConfig, download, read_url_list
from pipelines.training.data import generation_triples
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import save_checkpoint
from vlp_core.clip import load_clip, save_clip
from vlp_core.tokenizer import train_tokenizer


def _corrupt(table: pa.Table, path: Path, how: str) -> str:
    """Write a broken copy of `table` to `path`; returns the message the error must carry."""
    if how == "missing_column":
        pq.write_table(table.drop_columns(["caption"]), path)
        return "missing column 'caption'"
    if how == "renamed_column":
        renamed = table.rename_columns(["image_path" if n == "image_ref" else n for n in table.column_names])
        pq.write_table(renamed.replace_schema_metadata(table.schema.metadata), path)
        return "missing column 'image_ref'"
    if how == "wrong_type":
        index = table.schema.get_field_index("width")
        pq.write_table(table.set_column(index, "width", pa.array(["64"] * table.num_rows)), path)
        return "column 'width' has type string, expected int32"
    if how == "foreign_schema_version":
        pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"99"}), path)
        return "schema version 99"
    if how == "not_a_manifest":
        pq.write_table(table.replace_schema_metadata(None), path)
        return "not a capfilt manifest"
    if how == "truncated_parquet":
        pq.write_table(table, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "unreadable Parquet file"
    raise AssertionError(how)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    """A valid generation 0 (two parts, 4 kept rows) under tmp_path/manifests."""
    generation = Generation(tmp_path / "manifests", "web", 0)
    for shard in ("00000", "00001"):
        generation.write_part(
            "download",
            shard,
            samples_table(
                {
                    "image_id": [f"web-{shard}-{i}" for i in range(2)],
                    "image_ref": ["images/a.jpg"] * 2,
                    "caption": ["a red circle", "a blue square"],
                    "caption_source": ["web"] * 2,
                    "generation": [0] * 2,
                    "width": [64] * 2,
                    "height": [64] * 2,
                }
            ),
            {},
        )
    save_checkpoint(
        BlipModel.from_preset("tiny"),
        train_tokenizer(["a red circle", "a blue square"], vocab_size=64),
        tmp_path / "checkpoint",
    )  # a valid one: the stages must stop at the manifest
    (tmp_path / "clip.safetensors").touch()
    return tmp_path / "manifests"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "how",
    ["missing_column", "renamed_column", "wrong_type", "foreign_schema_version", "not_a_manifest", "truncated_parquet"],
)
def test_a_bad_manifest_part_stops_caption_and_pretrain_before_anything_is_written(
    how, web_root, tmp_path, capsys
) -> None:
    part = Generation(web_root, "web", 0).part_path("00001")
    message = _corrupt(Generation(web_root, "web", 0).read_samples(), part, how)
    before = _files(tmp_path)
    commands = {
        "caption": ["caption", "--root", web_root, "--generation", 1, "--checkpoint", tmp_path / "checkpoint"],
        "pretrain": [
            "pretrain",
            "--root",
            web_root,
            "--generation",
            0,
            "--preset",
            "tiny",
            "--run-dir",
            tmp_path / "run",
            "--max-steps",
            1,
        ],
    }
    for name, argv in commands.items():
        code, err = _run(argv, capsys)
        assert code == 2, name
        assert str(part) in err and message in err, (name, err)
    assert _files(tmp_path) == before, "nothing was written"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"images": [], "annotations": []}, "expected a JSON list of entries, got dict"),  # COCO's own format
        ([{"file_name": "a.jpg", "caption": "a cat"}], "entry 0: field 'image' must be a non-empty string"),
        ([{"image": "a.jpg", "caption": []}], "entry 0: field 'caption' must be a string or a non-empty list"),
        ("not json", "not valid JSON"),
        ([], "the list of entries is empty"),
        ([{"image": "../test/t1.jpg", "caption": "a cat"}], "must be a relative path that stays under the image root"),
        (
            [{"image": "/data/test/t1.jpg", "caption": "a cat"}],
            "must be a relative path that stays under the image root",
        ),
        ([{"image": "..\\test\\t1.jpg", "caption": "a cat"}], "must be a relative path that stays under"),
        ([{"image": "s3://other-bucket/t1.jpg", "caption": "a cat"}], "must be a relative path that stays under"),
        (
            [
                {"image": "a.jpg", "caption": "a cat", "image_id": 7},
                {"image": "b.jpg", "caption": "a dog", "image_id": 7},
            ],
            "entry 1: image_id '7' names image 'b.jpg', but an earlier entry gave it to 'a.jpg'",
        ),
    ],
)
def test_an_annotation_file_that_is_not_coco_karpathy_is_refused(payload, message, tmp_path, capsys) -> None:
    annotations = tmp_path / "human.json"
    annotations.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    before = _files(tmp_path)
    code, err = _run(
        [
            "finetune",
            "captioner",
            "--annotations",
            annotations,
            "--image-root",
            tmp_path,
            "--preset",
            "tiny",
            "--run-dir",
            tmp_path / "run",
            "--max-steps",
            1,
        ],
        capsys,
    )
    assert code == 2 and str(annotations) in err and message in err, err
    assert _files(tmp_path) == before


def _poison(module: torch.nn.Module) -> None:
    """One NaN and one inf in the first weight matrix, as a diverged training leaves them."""
    weight = next(p for p in module.parameters() if p.ndim == 2)
    with torch.no_grad():
        weight[0, 0], weight[-1, -1] = float("nan"), float("inf")


def test_non_finite_weights_stop_filter_and_rank_before_anything_is_written(web_root, tmp_path, capsys) -> None:
    model = BlipModel.from_preset("tiny")
    _poison(model)
    blip = tmp_path / "diverged"
    save_checkpoint(model, train_tokenizer(["a red circle", "a blue square"], vocab_size=64), blip)
    ranker = load_clip("clip_tiny")
    _poison(ranker.model)
    clip = tmp_path / "diverged-clip.safetensors"
    save_clip(ranker, clip)
    before = _files(tmp_path)
    for argv, named in (
        (["filter", "--checkpoint", blip], blip / "model.safetensors"),
        (["rank", "--clip-checkpoint", clip], clip),
    ):
        code, err = _run([*argv, "--root", web_root, "--generation", 1], capsys)
        assert code == 2, err
        assert str(named) in err and "2 non-finite value(s) (NaN or inf)" in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "--num-captions", -1], "num_captions"),
        (["caption", "--top-p", 0], "top_p"),
        (["caption", "--top-p", 1.5], "top_p"),
        (["caption", "--batch-size", 0], "batch_size"),
        (["rank", "--clip-checkpoint", "{clip}", "--top-k", 0], "top_k"),
        (["filter", "--checkpoint", "{ckpt}", "--threshold", 1.5], "threshold"),
        (["pretrain", "--preset", "gigantic", "--run-dir", "{run}", "--max-steps", 1], "preset must be one of"),
        (["pretrain", "--preset", "tiny", "--run-dir", "{run}", "--max-steps", -3], "max_steps"),
        (["pretrain", "--preset", "tiny", "--run-dir", "{run}", "--max-steps", 1, "--lr", -1], "lr"),
        (["download", "--url-list", "{urls}", "--threads", 0], "threads"),
        (["download", "--url-list", "{urls}", "--allow-network", "intranet"], "not a CIDR"),
    ],
)
def test_bad_config_values_fail_before_any_work(argv, message, web_root, tmp_path, capsys) -> None:
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://example.org/a.jpg,a cat\n")
    names = {
        "{ckpt}": tmp_path / "checkpoint",
        "{run}": tmp_path / "run",
        "{clip}": tmp_path / "clip.safetensors",
        "{urls}": tmp_path / "urls.csv",
    }
    argv = [names.get(a, a) for a in argv]
    if argv[0] in ("caption", "rank", "filter"):
        argv += ["--root", web_root, "--generation", 1]
        argv += ["--checkpoint", tmp_path / "checkpoint"] if argv[0] == "caption" else []
    elif argv[0] == "pretrain":
        argv += ["--root", web_root, "--generation", 0]
    else:
        argv += ["--root", web_root, "--dataset", "downloaded"]
    before = _files(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    assert _files(tmp_path) == before


def test_stray_copies_in_samples_are_never_read_as_data(web_root, caplog) -> None:
    generation = Generation(web_root, "web", 0)
    pairs, digest = len(list(generation_triples(generation))), manifest_digest(generation)
    part = generation.part_path("00001")
    # stray copies, and a well-named part that no stage marked (a crash between the part and its marker)
    strays = ("part-00001.backup.parquet", "part-00001.parquet.bak", "part-00001 (copy).parquet", "part-00002.parquet")
    for stray in strays:
        shutil.copy(part, generation.samples_dir / stray)
    assert generation.shards() == ["00000", "00001"]
    assert generation.read_samples().num_rows == 4
    assert len(list(generation_triples(generation))) == pairs
    assert manifest_digest(generation) == digest  # a training run keyed by it is still the same run
    assert "part-00001.backup.parquet" in caplog.text and "part-00002.parquet" in caplog.text


def test_a_marked_part_that_is_gone_stops_every_reader(web_root) -> None:
    generation = Generation(web_root, "web", 0)
    generation.part_path("00001").unlink()
    for read in (generation.shards, generation.counts, lambda: list(generation_triples(generation))):
        with pytest.raises(ManifestError, match=r"the parts of shard\(s\) \['00001'\] are missing"):
            read()


def _url_list(path: Path, captions: dict[int, str], n: int = 100) -> Path:
    """A CSV of n rows `http://example.org/<i>.jpg,caption <i>`, with the given rows' captions replaced."""
    lines = ["url,caption"] + [f"http://example.org/{i}.jpg,{captions.get(i, f'caption {i}')}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "captions, message",
    [
        ({9: '"Best hotel in town'}, "line 11 opens a quoted field that never closes"),  # the row 10
        ({99: '"Best hotel in town'}, "line 101 opens a quoted field that never closes"),  # the last row
        ({9: '"Best hotel', 40: 'Sale" today'}, "the caption of row 10 spans lines and holds what looks like"),
    ],
)
def test_a_url_list_whose_quotes_swallow_rows_is_refused(captions, message, tmp_path, capsys) -> None:
    urls = _url_list(tmp_path / "urls.csv", captions)
    before = _files(tmp_path)
    code, err = _run(["download", "--url-list", urls, "--root", tmp_path / "manifests"], capsys)
    assert code == 2 and str(urls) in err and message in err, err
    assert _files(tmp_path) == before


def test_a_quoted_caption_may_span_lines(tmp_path) -> None:
    table = read_url_list(_url_list(tmp_path / "urls.csv", {3: '"two\nlines, and ""quotes"""'}, n=6))
    assert table.num_rows == 6
    assert table["caption"].to_pylist()[3] == 'two\nlines, and "quotes"'


def test_a_second_writer_of_a_generation_fails_fast_naming_the_first(tmp_path) -> None:
    """Two downloads into one root: the second stops before writing, naming the first; the first's lock
    goes with it, and a lock left by a process that is gone is taken over."""
    urls = _url_list(tmp_path / "urls.csv", {}, n=3)  # example.org is refused by the URL policy: no fetching
    generation = Generation(tmp_path / "manifests", "web", 0)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pathlib import Path\nfrom pipelines.manifests.manifest import Generation\n"
            f"with Generation(Path({str(generation.root)!r}), 'web', 0).writer('download'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ManifestError, match=rf"is being written by download \(pid {holder.pid} on "):
            download(DownloadConfig(), urls, generation)
        assert not generation.samples_dir.exists()
    finally:
        holder.communicate("")  # closes its stdin: it leaves the `with` and releases the lock
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = generation.path / "writer.lock"
    assert not generation.path.exists()  # the holder wrote nothing, and left no empty folder
    generation.path.mkdir(parents=True)
    left = {"stage": "download", "pid": int(gone.stdout), "host": socket.gethostname(), "since": "earlier"}
    lock.write_text(json.dumps(left))
    assert download(DownloadConfig(), urls, generation)["rows"] == 3
    assert not lock.exists()


def _parquet(path: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("header_only.csv", lambda p: p.write_text("url,caption\n"), "the URL list has no rows"),
        ("empty.parquet", lambda p: _parquet(p, {"url": pa.array([], pa.string())}), "the URL list has no rows"),
        ("lists.parquet", lambda p: _parquet(p, {"url": [["http://a.org/1.jpg"]]}), "column 'url' must hold strings"),
        (
            "structs.parquet",
            lambda p: _parquet(p, {"url": ["http://a.org/1.jpg"], "caption": [{"en": "a cat"}]}),
            "column 'caption' must hold strings, got struct",
        ),
        ("urls.json", lambda p: p.write_text('[{"url": "http://a.org/1.jpg"}]'), "not a URL list format capfilt reads"),
        ("urls.txt", lambda p: p.write_text("http://a.org/1.jpg\n"), "give .parquet, .csv, .tsv, .csv.gz, .tsv.gz"),
    ],
)
def test_an_unreadable_url_list_is_one_line_naming_the_file(name, write, message, tmp_path, capsys) -> None:
    urls = tmp_path / name
    write(urls)
    before = _files(tmp_path)
    code, err = _run(["download", "--url-list", urls, "--root", tmp_path / "manifests"], capsys)
    assert code == 2 and f"{urls}: " in err and message in err, err
    assert "Traceback" not in err
    assert _files(tmp_path) == before


def test_upper_case_and_gzipped_url_lists_are_read(tmp_path) -> None:
    plain = _url_list(tmp_path / "urls.CSV", {1: '"two\nlines"'}, n=3)
    zipped = tmp_path / "urls.csv.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_url_list(plain).equals(read_url_list(zipped))
    assert read_url_list(zipped)["caption"].to_pylist() == ["caption 0", "two\nlines", "caption 2"]


def test_a_latin1_annotation_file_is_named_with_the_byte(tmp_path, capsys) -> None:
    annotations = tmp_path / "human.json"
    annotations.write_bytes('[{"image": "a.jpg", "caption": "un café"}]'.encode("latin-1"))
    code, err = _run(
        ["finetune", "captioner", "--annotations", annotations, "--image-root", tmp_path, "--preset", "tiny"]
        + ["--run-dir", tmp_path / "run", "--max-steps", 1],
        capsys,
    )
    assert code == 2 and f"{annotations}: not UTF-8 (byte 38 is b'\\xe9')" in err, err


def test_a_generation_record_without_counts_is_named(web_root, capsys) -> None:
    info = Generation(web_root, "web", 0).info_path
    info.write_text(json.dumps({"generation": 0, "parent_generation": None, "stages": ["download"]}))
    code, err = _run(["generations", "--root", web_root], capsys)
    assert code == 2 and f"{info}: not a generation record (missing ['counts'])" in err, err
