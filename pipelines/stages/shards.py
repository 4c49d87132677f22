"""Per-sample inference over a generation's shards, resumable shard by shard.

A stage (caption, filter, rank) turns each pending shard into *requests*, one per image: its image_ref
and the candidate captions (with their sample_ids) the model should look at. The requests of a wave of
pending shards (about WAVE_IMAGES images, so the driver's memory does not grow with the generation) are
decoded (`ImageDecoder`: in CPU tasks beside GPU actors) and flow through a Ray Data actor pool, whose
actors load the model once each per wave, or through one such actor in this process (the local executor,
or a single CPU actor, which Ray would only slow down: `ActorPoolConfig.in_process`). On the CPU every
batch is one block of one shard's requests, cut the same way on every run, so a shard's results do not
depend on which other shards a run still had to do, nor on the executor.

As soon as every image of a shard has its result, the stage merges the results into the shard's rows and
`commit_shard` rewrites the part atomically, then writes the stage's marker. A re-run skips marked
shards, so a run killed at any moment resumes, and every sample is in its part exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pyarrow as pa
import ray

from pipelines.executor import init_ray, resolve_executor, runs_in_process
from pipelines.manifests.images import ShardUnavailableError
from pipelines.manifests.manifest import SAMPLE_SCHEMA, Generation, ManifestError, read_part
from pipelines.progress import announce, progress
from pipelines.registry import MODEL_STAGES, stage_named
from pipelines.stages.actors import REQUEST_SCHEMA, SHARD_UNAVAILABLE, ImageDecoder, ImageModelActor, Row
from vlp_core.data import normalize_caption

log = logging.getLogger(__name__)

DEFAULT_MAX_CAPTION_CHARS = 300


def check_config(name: str, problems: list[tuple[bool, str]]) -> None:
    """Raise ValueError for the first (ok, message) pair that is not ok, naming the config."""
    for ok, message in problems:
        if not ok:
            raise ValueError(f"{name}: {message}")


CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256  # base at 384 px with 10 captions per image fits an 80 GB GPU (#16's measurements)


def default_batch_size(num_gpus: float) -> int:
    """Images per model call when none is given: GPUs need large calls to be kept busy."""
    return GPU_BATCH_SIZE if num_gpus > 0 else CPU_BATCH_SIZE


@dataclass(frozen=True, kw_only=True)
class ActorPoolConfig:
    """How a stage runs its model (Ray actors or tasks, or this process): shared by the caption, filter, rank and
    evaluate configs."""

    batch_size: int | None = None  # images per model call (one Ray Data block); None: 32 on a CPU, 256 on a GPU
    concurrency: int = 1  # Ray actors, each holding one copy of the model (local: one)
    num_gpus: float = 0.0  # GPUs per actor; 0 runs on the CPU
    executor: str | None = None  # "ray" or "local" (pipelines.executor); None: $CAPFILT_EXECUTOR, else ray
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray

    def __post_init__(self) -> None:
        object.__setattr__(self, "executor", resolve_executor(self.executor))
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", default_batch_size(self.num_gpus))
        check_config(
            type(self).__name__,
            [
                (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                (self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}"),
                (self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus}"),
            ],
        )

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def in_process(self) -> bool:
        """Whether the actor runs in this process (`pipelines.executor.runs_in_process`), not in Ray Data."""
        return runs_in_process(
            self.executor, workers=self.concurrency, num_gpus=self.num_gpus, ray_address=self.ray_address
        )


# --------------------------------------------------------------------------- rows


def captioned_shards(target: Generation) -> list[str]:
    """The target's candidate shards: those the caption stage finished. Other parts (the human pairs
    that assemble adds, a part whose caption run was cut short) are left alone, and named in the log."""
    shards = target.shards()
    captioned = [shard for shard in shards if target.is_done("caption", shard)]
    if not captioned:
        raise ManifestError(f"{target.path}: no captioned shards; run the caption stage into this generation first")
    if len(captioned) < len(shards):
        log.info(
            "%s: parts without a caption marker are not candidates: %s",
            target.path,
            sorted(set(shards) - set(captioned)),
        )
    return captioned


def shards_finished_by(target: Generation, stage: str) -> list[str]:
    """The target's candidate shards, after checking that `stage` finished every one of them."""
    shards = captioned_shards(target)
    unfinished = [shard for shard in shards if not target.is_done(stage, shard)]
    if unfinished:
        raise ManifestError(
            f"{target.path}: the {stage} stage has not finished shard(s) {unfinished}; run {stage} to completion first"
        )
    return shards


def rows_table(rows: list[Row]) -> pa.Table:
    """Manifest rows (dicts; absent columns are null) -> a table in the sample schema."""
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def undo_from(rows: list[Row], stage: str) -> list[Row]:
    """The rows as they were before `stage` ran: rejections by it or a later stage are lifted, and
    the scores those stages wrote are cleared."""
    undone = MODEL_STAGES[MODEL_STAGES.index(stage) :]
    cleared = {column: None for name in undone for column in stage_named(name).scores}
    lifted = {"kept": True, "reject_stage": None, "reject_reason": None, "reject_detail": None}
    return [{**row, **cleared, **(lifted if row["reject_stage"] in undone else {})} for row in rows]


def rejected(row: Row, stage: str, reason: str, detail: str | None = None) -> Row:
    return {**row, "kept": False, "reject_stage": stage, "reject_reason": reason, "reject_detail": detail}


def model_text(caption: str | None, max_chars: int) -> str | None:
    """The caption as the filter and ranker read it (cleaned); None when nothing is left."""
    return normalize_caption(caption or "", max_chars)[0]


def image_requests(shard: str, candidates: list[Row], texts: list[str] | None = None) -> pa.Table:
    """One request per image, in first-appearance order, carrying the sample_ids and texts of its
    candidate rows (`texts` aligned with `candidates`; None for a stage that reads only images)."""
    by_image: dict[str, Row] = {}
    for index, row in enumerate(candidates):
        request = by_image.setdefault(
            row["image_id"],
            {
                "shard": shard,
                "image_id": row["image_id"],
                "image_ref": row["image_ref"],
                "sample_ids": [],
                "texts": [],
            },
        )
        if texts is not None:
            request["sample_ids"].append(row["sample_id"])
            request["texts"].append(texts[index])
    return pa.Table.from_pylist(list(by_image.values()), schema=REQUEST_SCHEMA)


def caption_requests(shard: str, rows: list[Row], max_chars: int) -> pa.Table:
    """Requests to score every kept row that has an image and a caption that is not empty once cleaned."""
    candidates = [(row, model_text(row["caption"], max_chars)) for row in rows if row["kept"] and row["image_ref"]]
    candidates = [(row, text) for row, text in candidates if text is not None]
    return image_requests(shard, [row for row, _ in candidates], [text for _, text in candidates])


def scores_by_sample(results: list[Row], output: str) -> dict[str, Any]:
    """sample_id -> its value in the `output` list of the results (images that failed have none).

    A non-finite score stops the stage before its shard is written: thresholding or ranking NaN would
    keep arbitrary rows, and a model that scores NaN is broken for every sample.
    """
    scores = {
        sample: value
        for result in results
        if not result["error_reason"]
        for sample, value in zip(result["sample_ids"], result[output], strict=True)
    }
    for sample, value in scores.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"the model gave sample {sample} the {output} score {value}; non-finite scores mean broken weights "
                f"(model {results[0]['model_ref']}); nothing of this shard was written"
            )
    return scores


def image_seed(seed: int, image_id: str) -> int:
    """A 64-bit seed for one image, so its random draws do not depend on what it is batched with."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{image_id}".encode()).digest()[:8], "little")


# --------------------------------------------------------------------------- the shard loop


class ShardedStage(Protocol):
    """What an inference stage supplies to `run_sharded_inference`."""

    name: str

    def requests(self, shard: str) -> pa.Table:
        """The shard's images that need the model, in REQUEST_SCHEMA."""

    def actor(self) -> type[ImageModelActor]:
        """The actor class; it is built with the stage's config."""

    def merge(self, shard: str, results: list[Row]) -> tuple[pa.Table, dict[str, Any]]:
        """The shard's new rows given one result per request, and the marker's stats."""


@dataclass(frozen=True)
class CaptionScoringStage:
    """A `ShardedStage` that scores the kept captions of `target` in place (filter, rank); subclasses
    name the stage and its actor and write `merge`."""

    config: Any  # the stage's config: `max_caption_chars`, and what its actor reads
    target: Generation
    name: ClassVar[str]
    actor_class: ClassVar[type[ImageModelActor]]

    def rows(self, shard: str) -> list[Row]:
        """The shard as the stage before left it (a re-run after a crash ignores a half-done pass)."""
        return undo_from(read_part(self.target.part_path(shard)).to_pylist(), self.name)

    def requests(self, shard: str) -> pa.Table:
        return caption_requests(shard, self.rows(shard), self.config.max_caption_chars)

    def actor(self) -> type[ImageModelActor]:
        return self.actor_class


@dataclass
class _PendingShard:
    expected: int
    results: dict[str, Row] = field(default_factory=dict)  # image_id -> result (a retried block counts once)


WAVE_IMAGES = 100_000  # images whose requests are handed to the actors at once: bounds the driver's memory


def run_sharded_inference(
    stage: ShardedStage, target: Generation, shards: list[str], pool: ActorPoolConfig
) -> dict[str, Any]:
    """Run `stage` over every shard of `shards` without its marker in `target`, in waves of about
    WAVE_IMAGES images (whole shards); returns the target's `generation_counts`. `pool` is the stage's
    config: how its actors run, and what they read."""
    with target.writer(stage.name):
        todo = [shard for shard in shards if not target.is_done(stage.name, shard)]
        log.info("%s: %d of %d shards to do", stage.name, len(todo), len(shards))
        throughput = Throughput(actors=1 if pool.in_process else pool.concurrency)
        for pending in _waves(stage, todo):
            images = sum(map(len, pending.values()))
            log.info("%s: a wave of %d shards, %d images", stage.name, len(pending), images)
            waiting = {shard: _PendingShard(requests.num_rows) for shard, requests in pending.items()}
            for shard in [shard for shard, state in waiting.items() if state.expected == 0]:
                commit_shard(target, stage.name, shard, *stage.merge(shard, []))
                del waiting[shard]
            if not waiting:
                continue
            started = time.perf_counter()
            with progress(stage.name, total=images, unit="images") as advance:
                for result in _map_requests(stage, target, [pending[shard] for shard in waiting], pool):
                    if result["error_reason"] == SHARD_UNAVAILABLE:
                        raise ShardUnavailableError(result["error_detail"])
                    state = waiting[result["shard"]]
                    if result["image_id"] not in state.results:  # a retried block counts once
                        advance()
                        throughput.add(result["model_seconds"])
                    state.results[result["image_id"]] = result
                    if len(state.results) == state.expected:
                        shard = result["shard"]
                        commit_shard(target, stage.name, shard, *stage.merge(shard, list(state.results.values())))
            throughput.seconds += time.perf_counter() - started
        if throughput.images:
            announce(log, "%s: %s", stage.name, throughput)
        return target.counts()


@dataclass
class Throughput:
    """How fast an inference stage went: images through the actors, wall seconds (model loading
    included), and the seconds the actors spent in the model (the rest: decoding images, moving data)."""

    actors: int
    images: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0

    def add(self, model_seconds: float) -> None:
        self.images += 1
        self.model_seconds += model_seconds

    @property
    def model_busy(self) -> float:
        """The share of the actors' time spent in the model: on a GPU, how busy the stage kept it at most."""
        return self.model_seconds / (self.seconds * self.actors) if self.seconds else 0.0

    def __str__(self) -> str:
        actors = f"{self.actors} actor{'s' if self.actors > 1 else ''}"
        rate = self.images / self.seconds if self.seconds else 0.0
        return (
            f"{self.images:,} images in {self.seconds:.1f} s ({rate:,.0f} images/s), "
            f"model busy {self.model_busy:.0%} ({actors})"
        )


def _waves(stage: ShardedStage, shards: list[str]) -> Iterator[dict[str, pa.Table]]:
    """The shards' requests, built lazily and grouped into waves of whole shards of about WAVE_IMAGES
    images (the actor pool is started once per wave)."""
    wave: dict[str, pa.Table] = {}
    images = 0
    for shard in shards:
        wave[shard] = stage.requests(shard)
        images += wave[shard].num_rows
        if images >= WAVE_IMAGES:
            yield wave
            wave, images = {}, 0
    if wave:
        yield wave


def commit_shard(target: Generation, stage: str, shard: str, table: pa.Table, stats: dict[str, Any]) -> None:
    """Make `table` the shard's rows as of `stage`: the markers of later stages go first (their view
    is stale now), then the part is replaced, then the stage's marker is written."""
    for later in MODEL_STAGES[MODEL_STAGES.index(stage) + 1 :]:
        target.marker_path(later, shard).unlink(missing_ok=True)
    target.write_part(stage, shard, table, stats)
    log.info("%s: shard %s done %s", stage, shard, stats)


def _map_requests(
    stage: ShardedStage, target: Generation, requests: list[pa.Table], pool: ActorPoolConfig
) -> Iterator[Row]:
    """Stream the results of `stage`'s actor over the requests, one block of `batch_size` images at a time,
    each block decoded first (`ImageDecoder`): in this process (`pool.in_process`) or in Ray Data, with
    decode tasks on CPU workers feeding an actor pool."""
    blocks = [
        table.slice(start, pool.batch_size) for table in requests for start in range(0, table.num_rows, pool.batch_size)
    ]
    actor = stage.actor()
    decode = ImageDecoder(target.path.parent, actor.image_transform(pool))
    if pool.in_process:
        model = actor(pool)
        for block in blocks:
            yield from model(decode(block)).to_pylist()
        return
    init_ray(pool.ray_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.target_max_block_size = None  # a decoded block is never split: one block, one model call
    results = (
        ray.data.from_arrow(blocks)
        .map_batches(decode, batch_size=None, batch_format="pyarrow")  # fused into the actors unless they use GPUs
        .map_batches(
            actor,
            fn_constructor_args=(pool,),
            # On the CPU a batch is one block: the same images together on every run. Ray refuses GPU actors
            # without a batch size; its batches then may join the end of one shard's blocks to the next's
            # (captions are seeded per image, so only rounding can differ).
            batch_size=pool.batch_size if pool.num_gpus > 0 else None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
            num_gpus=pool.num_gpus,
        )
    )
    for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
