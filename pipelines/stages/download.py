"""Download stage: a URL list (url, caption) → webdataset shards (img2dataset) → the generation-0 manifest.

Every input URL becomes exactly one manifest row: downloaded ones are kept with their sha256 and size,
failed ones are marked `kept=False, reject_stage="download"` with a short reason (`http_404`,
`decode_error`, `timeout`, `url_policy`, `invalid_url`, `dns_error`, `too_large`, `truncated_body`, ...)
and img2dataset's message (or the URL check's) in `reject_detail`.
The URL policy is checked here before anything is fetched, and again on every connection img2dataset's
workers open, redirects included (pipelines.stages.download_worker).

Resume: img2dataset skips shards that have their `_stats.json`; a shard torn by a crash has none and is
downloaded again. Each finished shard is turned into `samples/part-<shard>.parquet` plus a completion
marker, so a re-run converts only what is missing.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipelines import registry
from pipelines.manifests.manifest import Generation, ManifestError, config_digest, generation_info, samples_table
from pipelines.progress import progress
from pipelines.stages.url_policy import POLICY_REASON, Refusal, UrlPolicy
from pipelines.stopping import img2dataset_stops_cleanly
from vlp_core.atomic import atomic_write_json, atomic_write_parquet, atomic_write_text
from vlp_core.decode import DEFAULT_MAX_PIXELS
from vlp_core.storage import Location, absolute, location, read_parquet

log = logging.getLogger(__name__)

STAGE = registry.DOWNLOAD.name
REFUSED_SHARD = "refused"
LOOPBACK = "127.0.0.1/32"


OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # img2dataset's default


@dataclass(frozen=True)
class DownloadConfig:
    """How img2dataset fetches. `allowed_networks` lets otherwise refused private ranges through."""

    image_size: int = 384  # shortest side after resizing; smaller images are kept as they are
    processes: int = 1
    threads: int = 16
    samples_per_shard: int = 1000
    timeout_s: int = 10  # per connect and per socket read
    retries: int = 0
    allowed_networks: tuple[str, ...] = ()
    max_image_bytes: int = 32 * 2**20  # a larger response body is refused (too_large)
    max_fetch_seconds: float = 120.0  # a body still arriving after this is cut off (timeout)
    max_pixels: int = DEFAULT_MAX_PIXELS  # an image declaring more pixels is not decoded (too_large)
    # X-Robots-Tag directives that opt an image out (rejected as `opt_out`); () downloads opted-out images too
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "processes",
            "threads",
            "samples_per_shard",
            "timeout_s",
            "max_image_bytes",
            "max_fetch_seconds",
            "max_pixels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"download config: {name} must be ≥ 1, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"download config: retries must be ≥ 0, got {self.retries}")
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))  # a list from JSON too
        UrlPolicy(self.allowed_networks)  # validates the CIDRs
        object.__setattr__(self, "opt_out_directives", tuple(d.strip().lower() for d in self.opt_out_directives))
        if not all(self.opt_out_directives):
            raise ValueError(f"download config: opt_out_directives holds an empty directive: {self.opt_out_directives}")


URL_LIST_FORMATS = {".parquet": None, ".csv": ",", ".tsv": "\t", ".csv.gz": ",", ".tsv.gz": "\t"}  # -> delimiter


def read_url_list(path: Location) -> pa.Table:
    """Read an img2dataset-style URL list (Parquet, or CSV / TSV, gzipped or not, with `url` and optional
    `caption` string columns). Anything else, or a list without rows, is a ManifestError naming the file.

    Returns a table with columns row_index (int64), url, caption (strings). `path` may be a URI."""
    path = location(path)
    if not path.exists():
        raise ManifestError(f"{path}: URL list not found")
    kind = next((suffix for suffix in URL_LIST_FORMATS if path.name.lower().endswith(suffix)), None)
    if kind is None:
        raise ManifestError(
            f"{path}: not a URL list format capfilt reads; give {', '.join(URL_LIST_FORMATS)} "
            "(img2dataset's url / caption columns)"
        )
    try:
        if URL_LIST_FORMATS[kind]:  # a quoted caption may hold line breaks
            delimiter = URL_LIST_FORMATS[kind]
            _check_quotes_close(path)
            parsing = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
            as_bytes = pacsv.ConvertOptions(column_types={"url": pa.binary(), "caption": pa.binary()})
            with _text_stream(path) as stream:  # no type guessing:
                table = pacsv.read_csv(stream, parse_options=parsing, convert_options=as_bytes)
            if "caption" in table.schema.names:
                _check_no_swallowed_rows(table["caption"], delimiter, path)
        else:
            table = read_parquet(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(f"{path}: cannot read URL list as {kind} ({error})") from None
    if "url" not in table.schema.names:
        raise ManifestError(f"{path}: URL list needs a 'url' column (found: {table.schema.names})")
    if table.num_rows == 0:
        raise ManifestError(f"{path}: the URL list has no rows")
    for name in ("url", "caption"):
        column_type = table.schema.field(name).type if name in table.schema.names else pa.string()
        textual = pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or _is_binary(column_type)
        if not (textual or pa.types.is_null(column_type)):  # null: a column without a value
            raise ManifestError(f"{path}: column '{name}' must hold strings, got {column_type}")
    captions = table["caption"] if "caption" in table.schema.names else pa.nulls(table.num_rows)
    return pa.table(
        {
            "row_index": pa.array(range(table.num_rows), pa.int64()),
            "url": _as_text(table["url"]),
            "caption": _as_text(captions),
        }
    )


def _text_stream(path: Location) -> pa.NativeFile:
    """The bytes of a CSV / TSV list, gunzipped when its name ends in .gz."""
    return pa.input_stream(path.open("rb"), compression="gzip" if path.name.lower().endswith(".gz") else None)


def _check_quotes_close(path: Location) -> None:
    """ManifestError naming the line where a quoted field opens and never closes: the parser would read
    every later line into that one caption (an escaped quote is doubled, so it never changes parity)."""
    open_since, line_number = None, 0
    with _text_stream(path) as stream, io.BufferedReader(stream) as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.count(b'"') % 2:
                open_since = line_number if open_since is None else None
    if open_since is not None:
        raise ManifestError(
            f"{path}: line {open_since} opens a quoted field that never closes (read to line {line_number}, the end); "
            'close the quote, or double it ("") to keep it in the caption'
        )


URL_START = re.compile(rb"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _check_no_swallowed_rows(captions: pa.ChunkedArray, delimiter: str, path: Location) -> None:
    """ManifestError when a caption spans lines of which one starts like a row (a URL, then the delimiter):
    quotes that pair up across rows have swallowed the rows between them."""
    for row, caption in enumerate(captions.to_pylist(), start=1):
        for line in (caption or b"").splitlines()[1:]:
            if URL_START.match(line) and delimiter.encode() in line:
                raise ManifestError(
                    f"{path}: the caption of row {row} spans lines and holds what looks like another row "
                    f"({line[:80].decode('utf-8', 'replace')!r}); a quote in it is not closed where it should be"
                )


def _is_binary(column_type: pa.DataType) -> bool:
    return pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """A string column. Bytes (how a CSV column is read, so that "007" stays "007" and "NaN" stays
    "NaN") are decoded as UTF-8, with U+FFFD for invalid bytes; caption cleaning drops those later."""
    if not _is_binary(column.type):
        return pc.cast(column, pa.string())
    return pa.array(
        [None if raw is None else raw.decode("utf-8", errors="replace") for raw in column.to_pylist()], pa.string()
    )


def download(config: DownloadConfig, url_list: Location, generation: Generation) -> dict[str, Any]:
    """Download every URL of `url_list` into `generation` (normally gen 0); returns its `generation_counts`."""
    with generation.writer(STAGE):
        urls = read_url_list(url_list)
        policy = UrlPolicy(config.allowed_networks)
        verdicts = policy.check_many(urls["url"].to_pylist())
        allowed = urls.filter(pa.array([v is None for v in verdicts]))
        log.info("download: %d URLs, %d refused by the URL policy", urls.num_rows, urls.num_rows - allowed.num_rows)

        _pin_settings(generation, config)
        pinned_input = _pin_input(generation, allowed)
        if not generation.is_done(STAGE, REFUSED_SHARD):
            _write_refused_part(generation, urls, verdicts)
        if allowed.num_rows:
            shard_dir = generation.path / "shards"
            if not _all_shards_done(generation, allowed.num_rows, config):
                with _shards_progress(shard_dir, allowed.num_rows):
                    _run_img2dataset(pinned_input, shard_dir, config)
            for stats_file in sorted(shard_dir.glob("*_stats.json")):
                shard = stats_file.name.removesuffix("_stats.json")
                if not generation.is_done(STAGE, shard):
                    _convert_shard(generation, shard_dir / f"{shard}.parquet")

        counts = generation.counts()
        if counts["rows"] != urls.num_rows:
            raise RuntimeError(
                f"download: manifest has {counts['rows']} rows for {urls.num_rows} URLs; some shards failed "
                f"(see {generation.path / 'shards'}); run the download again to retry them"
            )
        generation.write_info(
            generation_info(
                counts,
                dataset=generation.dataset,
                number=generation.number,
                parent=None,
                stages=[STAGE],
                config_digest=config_digest(asdict(config)),
                inputs={"url_list": str(absolute(location(url_list)))},
            )
        )
        return counts


def download_world(config: DownloadConfig, world_dir: Path, generation: Generation) -> dict[str, Any]:
    """Serve a synthetic world on loopback for the duration of its download (loopback allowed).

    A re-run serves on the port of the first run, so the URL list stays the same and finished shards
    are kept."""
    from pipelines.world.server import WorldServer

    config = replace(config, allowed_networks=(*config.allowed_networks, LOOPBACK))
    port_file = generation.path / "work" / "world_port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    with WorldServer(world_dir, port=port) as server:
        url_list = generation.path / "work" / "world_urls.parquet"
        if not url_list.exists():
            atomic_write_text(port_file, str(urlsplit(server.base_url).port))
            server.write_url_list(url_list)
        return download(config, url_list, generation)


def _write_refused_part(generation: Generation, urls: pa.Table, verdicts: list[Refusal | None]) -> None:
    refused = [(row, verdict) for row, verdict in zip(urls.to_pylist(), verdicts) if verdict is not None]
    rows = {
        "image_id": [_image_id(r["row_index"]) for r, _ in refused],
        "url": [r["url"] for r, _ in refused],
        "caption": [r["caption"] for r, _ in refused],
        "caption_source": ["web"] * len(refused),
        "generation": [generation.number] * len(refused),
        "kept": [False] * len(refused),
        "reject_stage": [STAGE] * len(refused),
        "reject_reason": [verdict.reason for _, verdict in refused],
        "reject_detail": [verdict.detail for _, verdict in refused],
    }
    generation.write_part(STAGE, REFUSED_SHARD, samples_table(rows), {"rows": len(refused)})


def _pin_input(generation: Generation, allowed: pa.Table) -> Location:
    """Write the img2dataset input once; a re-run must see the same list, or shard numbers would shift."""
    path = generation.path / "work" / "urls.parquet"
    if path.exists():
        if not read_parquet(path).equals(allowed):
            raise ManifestError(
                f"{generation.path}: was started with a different URL list or URL policy; "
                "download into a new generation folder (or delete this one)"
            )
    else:
        atomic_write_parquet(allowed, path)
    return path


# What shapes a generation's rows besides its URL list: how URLs are split into shards and what is kept.
ROW_SHAPING_SETTINGS = (
    "samples_per_shard",
    "image_size",
    "max_image_bytes",
    "max_pixels",
    "opt_out_directives",
    "allowed_networks",
)


def _pin_settings(generation: Generation, config: DownloadConfig) -> None:
    """Record the row-shaping settings once; a re-run or resume with others would mix two layouts."""
    path = generation.path / "work" / "download_settings.json"
    settings = json.loads(json.dumps({name: getattr(config, name) for name in ROW_SHAPING_SETTINGS}))
    if not path.exists():
        atomic_write_json(path, settings)
        return
    pinned = json.loads(path.read_text())
    changed = {name: (pinned.get(name), value) for name, value in settings.items() if pinned.get(name) != value}
    if changed:
        described = ", ".join(f"{name} {old!r} → {new!r}" for name, (old, new) in changed.items())
        raise ManifestError(
            f"{generation.path} was downloaded with other settings ({described}); re-run with the first ones, or "
            "download into a new generation folder"
        )


def _all_shards_done(generation: Generation, n_urls: int, config: DownloadConfig) -> bool:
    n_shards = -(-n_urls // config.samples_per_shard)
    return all(generation.is_done(STAGE, f"{i:05d}") for i in range(n_shards))


SHARD_POLL_SECONDS = 1.0


@contextmanager
def _shards_progress(shard_dir: Location, n_urls: int) -> Iterator[None]:
    """A progress bar of the URLs img2dataset has finished, shard by shard (its workers are other
    processes: a finished shard is one whose `_stats.json` has appeared)."""
    with progress("download", total=n_urls, unit="URLs") as advance:
        stop, counted = threading.Event(), set()

        def count_finished_shards() -> None:
            for stats_file in shard_dir.glob("*_stats.json"):
                if stats_file.name in counted:
                    continue
                try:
                    count = json.loads(stats_file.read_text())["count"]
                except (OSError, ValueError, KeyError):
                    continue  # still being written: counted at the next look
                counted.add(stats_file.name)
                advance(count)

        def watch() -> None:
            while not stop.wait(SHARD_POLL_SECONDS):
                count_finished_shards()

        count_finished_shards()  # a resumed download
        watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _run_img2dataset(input_path: Location, shard_dir: Location, config: DownloadConfig) -> None:
    """img2dataset writes the shards to `shard_dir` through fsspec: a local folder or a URI."""
    from img2dataset import download as img2dataset_download  # heavy imports, only when downloading

    from pipelines.stages.download_worker import FetchGuard, guarded_downloads

    guard = FetchGuard(
        UrlPolicy(config.allowed_networks),
        max_bytes=config.max_image_bytes,
        max_seconds=config.max_fetch_seconds,
        max_pixels=config.max_pixels,
    )
    with guarded_downloads(guard), img2dataset_stops_cleanly():
        img2dataset_download(
            url_list=str(input_path),
            output_folder=str(shard_dir),
            save_additional_columns=["row_index"],
            incremental_mode="incremental",
            disallowed_header_directives=list(config.opt_out_directives),  # [] respects none
            **img2dataset_options(config),
        )


def img2dataset_options(config: DownloadConfig) -> dict[str, Any]:
    """img2dataset's options for a parquet URL list (url, caption) read into webdataset shards, from `config`."""
    return {
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "output_format": "webdataset",
        "image_size": config.image_size,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": True,
        "processes_count": config.processes,
        "thread_count": config.threads,
        "number_sample_per_shard": config.samples_per_shard,
        "timeout": config.timeout_s,
        "retries": config.retries,
        "compute_hash": "sha256",
        "enable_wandb": False,
    }


def _convert_shard(generation: Generation, shard_parquet: Location) -> None:
    """img2dataset's per-sample parquet of one shard → one manifest part + its completion marker."""
    shard = shard_parquet.stem
    rows = read_parquet(shard_parquet).sort_by("row_index").to_pylist()
    ok = [r["status"] == "success" for r in rows]
    tar_ref = f"{generation.path.name}/shards/{shard}.tar"
    table = samples_table(
        {
            "image_id": [_image_id(r["row_index"]) for r in rows],
            "image_ref": [f"{tar_ref}#{r['key']}" if k else None for r, k in zip(rows, ok)],
            "url": [r["url"] for r in rows],
            "image_sha256": [r["sha256"] if k else None for r, k in zip(rows, ok)],
            "width": [r["original_width"] if k else None for r, k in zip(rows, ok)],
            "height": [r["original_height"] if k else None for r, k in zip(rows, ok)],
            "caption": [r["caption"] for r in rows],
            "caption_source": ["web"] * len(rows),
            "generation": [generation.number] * len(rows),
            "kept": ok,
            "reject_stage": [None if k else STAGE for k in ok],
            "reject_reason": [None if k else failure_reason(r["error_message"]) for r, k in zip(rows, ok)],
            "reject_detail": [None if k else r["error_message"] for r, k in zip(rows, ok)],
        }
    )
    generation.write_part(STAGE, shard, table, {"rows": len(rows), "succeeded": sum(ok)})
    log.info("download: shard %s → %d rows, %d images", shard, len(rows), sum(ok))


_REASONS = [  # first match wins
    (re.compile(rf"{POLICY_REASON}|Redirection to url '[^']*' is not allowed"), lambda m: POLICY_REASON),
    (re.compile(r"disallowed by X-Robots-Tag"), lambda m: "opt_out"),
    (re.compile(r"infinite loop", re.I), lambda m: "redirect_loop"),
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"empty_body"), lambda m: "empty_body"),
    (re.compile(r"truncated_body|IncompleteRead"), lambda m: "truncated_body"),
    (re.compile(r"too_large|CV_IO_MAX_IMAGE_PIXELS"), lambda m: "too_large"),
    (re.compile(r"timed out", re.I), lambda m: "timeout"),
    (re.compile(r"Connection refused", re.I), lambda m: "connection_refused"),
    (re.compile(r"redirect", re.I), lambda m: "redirect_error"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), lambda m: "dns_error"),
    (re.compile(r"unknown url type|unsupported", re.I), lambda m: "unsupported_url"),
    (
        re.compile(r"not_an_image|truncated|corrupt|cannot identify image|decod|image file", re.I),
        lambda m: "decode_error",
    ),
]


def failure_reason(error_message: str | None) -> str:
    """A short, stable reason for an img2dataset error message (the message itself goes to reject_detail)."""
    for pattern, reason in _REASONS:
        match = pattern.search(error_message or "")
        if match:
            return reason(match)
    return "download_error"


def _image_id(row_index: int) -> str:
    return f"web-{row_index:09d}"
