"""The download stage against the synthetic world's loopback server, with real img2dataset."""

import dataclasses
import hashlib
import io
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.manifests.images import ImageRefError, ImageStore
from pipelines.manifests.manifest import Generation, ManifestError, generation_counts
from pipelines.stages.download import DownloadConfig, download, download_world, failure_reason, read_url_list
from pipelines.world.generate import WorldConfig, make_world
from pipelines.world.server import WorldServer

N_WEB = 300
EXPECTED_REASON = {"http_404": "http_404", "corrupt": "decode_error", "html": "decode_error"}
CONFIG = DownloadConfig(samples_per_shard=100, threads=8, allowed_networks=("127.0.0.1/32",))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world_dir = tmp_path_factory.mktemp("world")
    make_world(world_dir, WorldConfig(seed=3, n_web=N_WEB, n_human=4, n_test=4))
    return world_dir


@pytest.fixture(scope="module")
def server(world: Path):
    with WorldServer(world) as running:
        yield running


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory, server: WorldServer):
    url_list = server.write_url_list(tmp_path_factory.mktemp("urls") / "urls.parquet")
    generation = Generation(tmp_path_factory.mktemp("manifests"), "world", 0)
    download(CONFIG, url_list, generation)
    return url_list, generation, generation.read_samples()


def _truth(world: Path) -> dict[str, dict]:
    rows = pq.read_table(world / "ground_truth" / "web_noise.parquet").to_pylist()
    pairs = pq.read_table(world / "web" / "pairs.parquet").to_pylist()
    faults = {r["key"]: r["fault"] for r in rows}
    return {p["path"]: {"fault": faults[p["key"]], "caption": p["caption"]} for p in pairs}


def test_every_url_is_one_row_with_its_fate(world: Path, downloaded) -> None:
    url_list, generation, table = downloaded
    assert table.num_rows == N_WEB == read_url_list(url_list).num_rows
    assert len(set(table["url"].to_pylist())) == N_WEB
    truth = _truth(world)
    seen_faults = set()
    for row in table.to_pylist():
        path = row["url"].split("/", 3)[3]
        fault = truth[path]["fault"]
        assert row["caption"] == truth[path]["caption"]
        assert row["caption_source"] == "web" and row["generation"] == 0
        if fault in EXPECTED_REASON:
            seen_faults.add(fault)
            assert not row["kept"], row
            assert (row["reject_stage"], row["reject_reason"]) == ("download", EXPECTED_REASON[fault]), row
            assert row["reject_detail"], "the original error message is kept"
        else:  # clean URLs and the slow one succeed
            assert row["kept"] and row["reject_reason"] is None, row
            assert row["width"] == row["height"] == 64
    assert seen_faults == set(EXPECTED_REASON)
    info = generation.read_info()
    assert info["counts"]["rows"] == N_WEB and info["stages"] == ["download"]


def test_successes_decode_and_match_their_hash(world: Path, downloaded) -> None:
    _, generation, table = downloaded
    store = ImageStore(generation.path.parent)
    kept = [r for r in table.to_pylist() if r["kept"]]
    assert len(kept) > 0.9 * N_WEB
    for row in kept:
        image = Image.open(io.BytesIO(store.read(row["image_ref"]))).convert("RGB")
        assert image.size == (row["width"], row["height"])
    # img2dataset hashes the bytes it fetched: they are the bytes the server holds.
    clean = next(r for r in kept if "/images/" in r["url"])
    served = world / "web" / clean["url"].split("/", 3)[3]
    assert clean["image_sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    with pytest.raises(ImageRefError, match="no image with key"):
        store.read(kept[0]["image_ref"].split("#")[0] + "#nope")


def test_rerun_skips_finished_shards_and_redoes_a_torn_one(world: Path, downloaded) -> None:
    url_list, generation, table = downloaded
    shards = sorted((generation.path / "shards").glob("*.tar"))
    assert len(shards) == 3
    before = {p: p.stat().st_mtime_ns for p in shards}

    assert download(CONFIG, url_list, generation) == generation_counts([table])
    assert generation.read_samples().equals(table)
    assert {p: p.stat().st_mtime_ns for p in shards} == before, "finished shards were not touched"

    torn = shards[1]
    torn.write_bytes(torn.read_bytes()[:1000])
    (torn.parent / f"{torn.stem}_stats.json").unlink()
    generation.marker_path("download", torn.stem).unlink()
    generation.part_path(torn.stem).unlink()
    download(CONFIG, url_list, generation)
    assert generation.read_samples().to_pylist() == table.to_pylist()
    assert torn.stat().st_size > 1000
    assert shards[0].stat().st_mtime_ns == before[shards[0]]


def test_a_download_leaves_the_sigint_handler_as_it_found_it(tmp_path: Path, server: WorldServer) -> None:
    """img2dataset installs a SIGINT handler of its own (exit status 0) and leaves it: the stage takes it away."""
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(server.write_url_list(tmp_path / "all.parquet")).slice(0, 4), url_list)

    def before(signal_number: int, frame) -> None:
        raise AssertionError("not called")

    signal.signal(signal.SIGINT, before)
    try:
        assert download(CONFIG, url_list, Generation(tmp_path / "manifests", "world", 0))["rows"] == 4
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_url_policy_refuses_loopback_unless_allowed(tmp_path: Path, downloaded) -> None:
    url_list, _, _ = downloaded
    generation = Generation(tmp_path, "world", 0)
    download(DownloadConfig(), url_list, generation)
    table = generation.read_samples()
    assert table.num_rows == N_WEB
    assert set(table["reject_reason"].to_pylist()) == {"url_policy"}
    assert not (generation.path / "shards").exists(), "nothing was fetched"


def test_changed_url_list_is_refused_for_an_existing_generation(tmp_path: Path, downloaded) -> None:
    url_list, generation, _ = downloaded
    shorter = tmp_path / "shorter.parquet"
    pq.write_table(pq.read_table(url_list).slice(0, 10), shorter)
    with pytest.raises(ManifestError, match="different URL list"):
        download(CONFIG, shorter, generation)


def test_a_rerun_with_another_shard_size_is_refused_and_changes_nothing(downloaded) -> None:
    url_list, generation, table = downloaded
    files = {path: path.stat().st_mtime_ns for path in generation.path.rglob("*") if path.is_file()}
    for changed, message in (
        ({"samples_per_shard": 40}, "samples_per_shard 100 → 40"),
        ({"image_size": 64}, "image_size 384 → 64"),
        ({"opt_out_directives": ()}, "opt_out_directives"),
    ):
        with pytest.raises(ManifestError, match=f"was downloaded with other settings .*{message}"):
            download(dataclasses.replace(CONFIG, **changed), url_list, generation)
    assert {path: path.stat().st_mtime_ns for path in generation.path.rglob("*") if path.is_file()} == files
    assert generation.read_samples().equals(table)
    download(dataclasses.replace(CONFIG, threads=2), url_list, generation)  # threads: speed only
    assert generation.read_samples().equals(table)


def test_bad_url_list_and_config_fail_fast(tmp_path: Path) -> None:
    no_url = tmp_path / "no_url.csv"
    no_url.write_text("link,caption\nhttp://x/a.jpg,a cat\n")
    with pytest.raises(ManifestError, match="needs a 'url' column"):
        read_url_list(no_url)
    with pytest.raises(ManifestError, match="not found"):
        read_url_list(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="threads must be"):
        DownloadConfig(threads=0)


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("Image decoding error", "decode_error"),
        ("something new", "download_error"),
        (None, "download_error"),
    ],
)
def test_failure_reasons(message: str, reason: str) -> None:
    assert failure_reason(message) == reason


def test_a_world_download_resumes_on_the_same_port(tmp_path: Path, world: Path) -> None:
    generation = Generation(tmp_path, "world", 0)
    config = DownloadConfig(samples_per_shard=100, threads=8)
    download_world(config, world, generation)
    first = generation.read_samples()
    written = {p: p.stat().st_mtime_ns for p in generation.path.rglob("*") if p.is_file() and p.suffix != ".json"}
    download_world(config, world, generation)
    assert generation.read_samples().equals(first)
    assert {p: p.stat().st_mtime_ns for p in written} == written, "a finished download rewrites nothing"


@pytest.mark.slow
def test_a_sigkilled_download_resumes_to_the_uninterrupted_manifest(tmp_path: Path, downloaded, kill_midway) -> None:
    """Killed (with img2dataset's worker processes) after some shards; the re-run equals an uninterrupted run."""
    url_list, _, uninterrupted = downloaded
    killed = Generation(tmp_path, "world", 0)
    code = (
        "from pathlib import Path\n"
        "from pipelines.stages.download import DownloadConfig, download\n"
        "from pipelines.manifests.manifest import Generation\n"
        f"download(DownloadConfig(**{dataclasses.asdict(CONFIG)!r}), Path({str(url_list)!r}), "
        f"Generation(Path({str(tmp_path)!r}), 'world', 0))\n"
    )
    stats = killed.path / "shards"
    kill_midway(
        code,
        killed,
        "download",
        ["00000", "00001", "00002"],
        finished=lambda shard: (stats / f"{shard}_stats.json").exists(),
    )

    download(CONFIG, url_list, killed)
    resumed = killed.read_samples()
    assert len(set(resumed["image_id"].to_pylist())) == resumed.num_rows == N_WEB
    assert resumed.to_pylist() == uninterrupted.to_pylist()
