"""Parquet manifests: the contract between stages (data_manifests/README.md describes the format for users).

A dataset generation lives in `<root>/<dataset>/gen-<NNNN>/`:

    samples/part-<shard>.parquet   one row per (image, candidate caption); rows are never deleted, only marked
    markers/<stage>/<shard>.json   completion marker of one shard of one stage (written last, atomically)
    generation.json                lineage: parent, config digest, code version, checkpoints, counts

Every file is written atomically; every read validates the schema and names the file and column at fault.
The root may be a local folder or a URI (`vlp_core.storage`): the same files, in a bucket.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlp_core.atomic import atomic_write_json, atomic_write_parquet
from vlp_core.storage import Location, absolute, create_exclusive, is_remote, location

log = logging.getLogger(__name__)
WRITER_LOCK = "writer.lock"
_HELD_LOCKS: set[str] = set()  # writer locks this process holds (Generation.writer is re-entrant)
SHARD_NAME = r"[A-Za-z0-9]+"  # "00000", "human", "refused"

SCHEMA_VERSION = 2
SCHEMA_VERSION_KEY = b"capfilt.schema_version"
CAPTION_SOURCES = ("web", "synthetic", "human")

_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),  # stable hash of (image_id, source, caption)
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_ref", pa.string()),  # "<shard tar>#<key>" or an image file path
    pa.field("url", pa.string()),  # web pairs only
    pa.field("image_sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("caption_source", pa.string(), nullable=False),  # web | synthetic | human
    pa.field("generation", pa.int32(), nullable=False),
    pa.field("parent_generation", pa.int32()),
    pa.field("itm_score", pa.float32()),
    pa.field("itc_score", pa.float32()),
    pa.field("clip_score", pa.float32()),
    pa.field("clip_rank", pa.int32()),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reject_stage", pa.string()),  # download | caption | filter | rank | ...
    pa.field("reject_reason", pa.string()),  # short machine-usable reason, e.g. http_404
    pa.field("reject_detail", pa.string()),  # the original error message, for humans
    pa.field("model_ref", pa.string()),  # checkpoint digest that made the caption/score
    pa.field("caption_backend", pa.string()),  # synthetic captions: the captioner backend that wrote it
    pa.field("caption_prompt", pa.string()),  # synthetic captions: the prompt it was given (null: none)
    pa.field("filter_clip_score", pa.float32()),  # the filter's CLIP-score scorer: its cosine similarity
]
COLUMNS_ADDED = {2: ("caption_backend", "caption_prompt", "filter_clip_score")}  # by the version that added them
SAMPLE_SCHEMA = pa.schema(_FIELDS, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


class ManifestError(ValueError):
    """A manifest file is missing, unreadable, or does not match the schema."""


def sample_id(image_id: str, caption_source: str, caption: str | None) -> str:
    """Stable id of one (image, caption) pair: the first 16 hex digits of a sha256."""
    key = "\x1f".join([image_id, caption_source, caption or ""])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def samples_table(columns: Mapping[str, Iterable[Any]]) -> pa.Table:
    """Build a schema-conformant table from the given columns; absent nullable columns become null,
    an absent `kept` becomes True and an absent `sample_id` is derived from image/source/caption."""
    data = {name: list(values) for name, values in columns.items()}
    unknown = sorted(set(data) - set(SAMPLE_SCHEMA.names))
    if unknown:
        raise ManifestError(f"unknown manifest column(s) {unknown}; known: {SAMPLE_SCHEMA.names}")
    n_rows = len(next(iter(data.values()))) if data else 0
    if "sample_id" not in data:
        data["sample_id"] = [
            sample_id(i, s, c) for i, s, c in zip(data["image_id"], data["caption_source"], data["caption"])
        ]
    data.setdefault("kept", [True] * n_rows)
    arrays = [pa.array(data.get(f.name, [None] * n_rows), type=f.type) for f in SAMPLE_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)
    validate_table(table, source="new table")
    return table


def validate_table(table: pa.Table, source: str) -> None:
    """Raise ManifestError naming `source` and the column if `table` does not match SAMPLE_SCHEMA."""
    validate_schema(table.schema, source)
    validate_values(table, source)


def validate_schema(schema: pa.Schema, source: str) -> int:
    """The schema half of `validate_table`: version, column names and types. Returns the version; a part
    of an older version may lack the columns added since (`COLUMNS_ADDED`)."""
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is None:
        raise ManifestError(f"{source}: not a capfilt manifest (no '{SCHEMA_VERSION_KEY.decode()}' metadata)")
    if version not in {str(number).encode() for number in range(1, SCHEMA_VERSION + 1)}:
        raise ManifestError(
            f"{source}: schema version {version.decode()}, this capfilt reads versions 1 to {SCHEMA_VERSION}; "
            "re-create the generation with this version or use a matching capfilt release"
        )
    number = int(version)
    added_since = _added_after(number)
    for expected in SAMPLE_SCHEMA:
        if expected.name in added_since:
            continue
        if expected.name not in schema.names:
            raise ManifestError(f"{source}: missing column '{expected.name}' (found: {schema.names})")
        actual = schema.field(expected.name).type
        if actual != expected.type:
            raise ManifestError(f"{source}: column '{expected.name}' has type {actual}, expected {expected.type}")
    return number


def _added_after(version: int) -> set[str]:
    return {name for added, names in COLUMNS_ADDED.items() if added > version for name in names}


def validate_values(table: pa.Table, source: str) -> None:
    """The values half of `validate_table`, on the columns `table` has: no nulls in required columns,
    only known caption sources."""
    for expected in SAMPLE_SCHEMA:
        if not expected.nullable and expected.name in table.column_names and table[expected.name].null_count:
            raise ManifestError(f"{source}: column '{expected.name}' has null values; it is required")
    if "caption_source" in table.column_names:
        bad_sources = set(pc.unique(table["caption_source"]).to_pylist()) - set(CAPTION_SOURCES)
        if bad_sources:
            raise ManifestError(
                f"{source}: column 'caption_source' has {sorted(bad_sources)}; allowed {CAPTION_SOURCES}"
            )


@dataclass(frozen=True)
class Generation:
    """One dataset generation folder: `<root>/<dataset>/gen-<NNNN>/`; `root` is a local path or a URI."""

    root: Location
    dataset: str
    number: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", location(self.root))  # a string root (e.g. a flow parameter) too

    @property
    def path(self) -> Location:
        return self.root / self.dataset / f"gen-{self.number:04d}"

    @property
    def samples_dir(self) -> Location:
        return self.path / "samples"

    @property
    def info_path(self) -> Location:
        return self.path / "generation.json"

    def part_path(self, shard: str) -> Location:
        if not re.fullmatch(SHARD_NAME, shard):
            raise ValueError(f"shard names are letters and digits, got {shard!r}")
        return self.samples_dir / f"part-{shard}.parquet"

    def shards(self) -> list[str]:
        """The shards of this generation's parts, sorted: those a stage's completion marker lists
        (`markers/<stage>/<shard>.json`, written right after its part by `write_part`). Nothing else in
        `samples/` is read as data (a stray copy such as `part-00001.backup.parquet`, a part whose stage was
        cut off before its marker); such files are named in the log. A marked part that is gone is an error."""
        marked = sorted(
            {path.stem for path in (self.path / "markers").glob("*/*.json") if re.fullmatch(SHARD_NAME, path.stem)}
        )
        names = sorted(path.name for path in self.samples_dir.iterdir()) if self.samples_dir.is_dir() else []
        missing = [shard for shard in marked if self.part_path(shard).name not in names]  # one listing, not a look each
        if missing:
            raise ManifestError(
                f"{self.samples_dir}: the parts of shard(s) {missing} are missing, though a stage marked them done "
                f"(see {self.path / 'markers'}); data was lost: delete those markers and re-run the stage"
            )
        listed = {self.part_path(shard).name for shard in marked}
        strays = [name for name in names if name not in listed and not name.startswith(".")]
        if strays:
            log.warning(
                "%s: ignoring files that no stage marker lists as parts: %s", self.samples_dir, ", ".join(strays)
            )
        return marked

    def marker_path(self, stage: str, shard: str) -> Location:
        return self.path / "markers" / stage / f"{shard}.json"

    def is_done(self, stage: str, shard: str) -> bool:
        return self.marker_path(stage, shard).exists()

    def mark_done(self, stage: str, shard: str, stats: Mapping[str, Any]) -> None:
        atomic_write_json(self.marker_path(stage, shard), dict(stats))

    def write_part(self, stage: str, shard: str, table: pa.Table, stats: Mapping[str, Any]) -> Location:
        """Validate and atomically write one shard's rows, then `stage`'s marker for it (with `stats`): the
        marker is what makes the part this generation's data (`shards`)."""
        validate_table(table, source=f"rows for {self.part_path(shard)}")
        path = atomic_write_parquet(table, self.part_path(shard))
        self.mark_done(stage, shard, stats)
        return path

    def iter_parts(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """This generation's rows one part at a time, validated, ordered by part name (only `columns` when
        given). Whole-generation readers stream through this: memory is bounded by the largest part (one
        download shard's rows), not by the generation."""
        parts = [self.part_path(shard) for shard in self.shards()]
        if not parts:
            raise ManifestError(f"{self.path}: no parts that a stage marked done; is this a generation folder?")
        for path in parts:
            yield read_part(path, columns)

    def counts(self) -> dict[str, Any]:
        """`generation_counts` of this generation's rows, streamed part by part."""
        return generation_counts(self.iter_parts(COUNT_COLUMNS))

    def read_samples(self) -> pa.Table:
        """All rows of this generation in one table: for tests and small generations (see `iter_parts`)."""
        return pa.concat_tables(self.iter_parts())

    @contextmanager
    def writer(self, stage: str) -> Iterator[None]:
        """Hold this generation's writer lock while `stage` writes it: a second writer (another stage, or
        the same one started twice) fails fast naming the holder. Re-entrant within a process. A lock left
        by a dead process on this host is taken over; one held from another host must be removed by hand
        once that run is gone. The lock file appears whole and only where none exists (`create_exclusive`:
        a hard link locally, a conditional write in an object store), so one claimant wins."""
        path = absolute(self.path / WRITER_LOCK)
        if str(path) in _HELD_LOCKS:
            yield
            return
        made: list[Location] = []  # the folders this writer makes (an object store has none)
        if not is_remote(path):
            made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
        me = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        while True:
            try:
                create_exclusive(path, json.dumps(me).encode())
                break
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and _alive(holder):
                    raise ManifestError(
                        f"{self.path} is being written by {holder['stage']} (pid {holder['pid']} on "
                        f"{holder['host']} since {holder['since']}); wait for it to finish, or delete {path} "
                        "if that run is gone"
                    ) from None
                log.warning("%s: taking over the lock of a run that is gone (%s)", self.path, holder)
                path.unlink(missing_ok=True)
        _HELD_LOCKS.add(str(path))
        try:
            yield
        finally:
            _HELD_LOCKS.discard(str(path))
            path.unlink(missing_ok=True)
            for folder in made:  # a writer that wrote nothing leaves no empty folders behind
                if not any(folder.iterdir()):
                    folder.rmdir()

    def write_info(self, info: Mapping[str, Any]) -> None:
        atomic_write_json(self.info_path, dict(info))

    def read_info(self) -> dict[str, Any]:
        """generation.json, checked to hold what its readers use (`generation_info` writes it)."""
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{self.info_path}: missing; the generation was not finished") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"{self.info_path}: not valid JSON ({error})") from None
        missing = [key for key in INFO_KEYS if not isinstance(info, dict) or key not in info]
        if missing or not isinstance(info["counts"], dict) or not COUNT_KEYS <= info["counts"].keys():
            raise ManifestError(
                f"{self.info_path}: not a generation record (missing {missing or 'counts: ' + str(COUNT_KEYS)}); "
                "re-run the stage that finishes this generation (download or assemble) to rewrite it"
            )
        return info


INFO_KEYS = ("generation", "parent_generation", "stages", "counts")
COUNT_KEYS = frozenset({"rows", "kept", "rows_by_source", "kept_by_source", "rejected_by_stage_reason"})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _read_lock(path: Location) -> dict[str, Any] | None:
    """The holder recorded in a lock file; None when it is unreadable (damaged, or not ours)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"stage", "pid", "host", "since"} <= holder.keys() else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run: any process on another host, a live PID on this one."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_part(path: Location, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet part file (only `columns`, when given) after validating its schema."""
    try:
        with path.open("rb") as stream, pq.ParquetFile(stream) as file:
            missing = _added_after(validate_schema(file.schema_arrow, source=str(path)))
            table = file.read(columns=None if columns is None else [name for name in columns if name not in missing])
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(f"{path}: unreadable Parquet file ({error})") from None
    validate_values(table, source=str(path))
    if not missing:
        return table
    return _upgraded(table, SAMPLE_SCHEMA.names if columns is None else list(columns))


def _upgraded(table: pa.Table, names: list[str]) -> pa.Table:
    """A part of an older schema version as this version reads it: the `names` columns, those added since null."""
    fields = [SAMPLE_SCHEMA.field(name) for name in names]
    arrays = [table[f.name] if f.name in table.column_names else pa.nulls(len(table), f.type) for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=SAMPLE_SCHEMA.metadata))


COUNT_COLUMNS = ("image_id", "caption_source", "kept", "reject_stage", "reject_reason")


def generation_counts(parts: Iterable[pa.Table]) -> dict[str, Any]:
    """Counts for generation.json and reports, summed over `parts` (tables with COUNT_COLUMNS): rows, images
    and kept rows per source; rejects per stage/reason. An image's rows of one source are in one part (a
    download shard's, or part-human), so distinct images are counted per part."""
    rows, kept, images = Counter(), Counter(), Counter()
    rejects: Counter[str] = Counter()
    for part in parts:
        grouped = part.group_by("caption_source").aggregate(
            [("kept", "count"), ("kept", "sum"), ("image_id", "count_distinct")]
        )
        for row in grouped.to_pylist():
            rows[row["caption_source"]] += row["kept_count"]
            kept[row["caption_source"]] += row["kept_sum"]
            images[row["caption_source"]] += row["image_id_count_distinct"]
        rejected = part.filter(pc.invert(part["kept"])).group_by(["reject_stage", "reject_reason"])
        for row in rejected.aggregate([("kept", "count")]).to_pylist():
            rejects[f"{row['reject_stage']}/{row['reject_reason']}"] += row["kept_count"]
    return {
        "rows": rows.total(),
        "kept": kept.total(),
        "rows_by_source": dict(sorted(rows.items())),
        "kept_by_source": dict(sorted((source, n) for source, n in kept.items() if n)),
        "images_by_source": dict(sorted(images.items())),
        "rejected_by_stage_reason": dict(sorted(rejects.items())),
    }


def generation_info(
    counts: dict[str, Any],
    *,
    dataset: str,
    number: int,
    parent: int | None,
    stages: list[str],
    config_digest: str,
    checkpoints: Mapping[str, str] | None = None,
    inputs: Mapping[str, str] | None = None,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """The generation.json lineage record of a finished generation."""
    from importlib.metadata import version

    return {
        "format_version": SCHEMA_VERSION,
        "dataset": dataset,
        "generation": number,
        "parent_generation": parent,
        "stages": stages,
        "config_digest": config_digest,
        "code_version": version("capfilt"),
        "checkpoints": dict(checkpoints or {}),
        "inputs": dict(inputs or {}),
        "flow_run_id": flow_run_id,
        "created_at": _now(),
        "counts": counts,
    }


def list_generations(root: Location) -> list[Generation]:
    """Every generation under `root` that has a generation.json, by dataset then number."""
    root = location(root)
    found = []
    for info in sorted(root.glob("*/gen-*/generation.json"), key=str):
        number = info.parent.name.removeprefix("gen-")
        if number.isdigit():
            found.append(Generation(root, info.parent.parent.name, int(number)))
    return found


def manifest_digest(generation: Generation) -> str:
    """A digest of a generation's rows (its part files' names and bytes): `sha256:<16 hex>`."""
    digest = hashlib.sha256()
    for part in (generation.part_path(shard) for shard in generation.shards()):
        digest.update(part.name.encode())
        with part.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def config_digest(config: Mapping[str, Any]) -> str:
    """A short, stable digest of a JSON-serialisable config: `sha256:<16 hex>`."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
