"""Scale: time and peak memory of everything that reads a whole generation, at two sizes side by side.

`capfilt bench scale` builds a synthetic generation of N rows (default 1M and 10M; 20 candidates per image:
the web caption and 19 synthetic ones; 5,000 images = 100,000 rows per part, about what img2dataset's
10,000-image shards give with K = 10) from a small world's captions and (clean) images, then runs each reader in
a fresh process and records its wall time and peak RSS:

    generations   `capfilt generations` (reads generation.json files only)
    assemble      adds the human part and recounts the generation
    report        `write_report` (figures, plots, page, thumbnails)
    arm rules     derives the ablation arm `capfilt_rank` (one arm's rules over every part)
    loader        the training pair file, then the loader's first 1,000 batches of 32

The goals (issue #22): peak RSS under 2 GB for each, flat in N (largest / smallest ≤ 1.2x), time linear.
Synthetic captions join two of the world's captions, so distinct captions grow with N as on real data.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import Measurement, Report, load_1min, machine, process_status_kib, time_once
from pipelines.manifests.manifest import Generation, generation_info, samples_table
from pipelines.world.generate import WorldConfig, WorldPaths, make_world

SIZES, QUICK_SIZES = (1_000_000, 10_000_000), (2_000, 20_000)
CANDIDATES = 20
IMAGES_PER_PART = 5_000
LOADER_BATCHES, QUICK_LOADER_BATCHES, BATCH_SIZE = 1_000, 20, 32
OPERATIONS = ("generations", "assemble", "report", "arm rules", "loader")
CHECKPOINTS = {"captioner": "sha256:bench", "filter": "sha256:bench", "clip": "sha256:bench"}
MODEL_STAGES = ("caption", "filter", "rank")


def build_generation(root: Path, world_dir: Path, n_rows: int, seed: int = 0) -> Generation:
    """Generation 1 of dataset `bench` under `root` with `n_rows` candidate rows, ready for assemble."""
    world = make_world(world_dir, WorldConfig(seed=seed, n_web=400, n_human=50, n_test=0))
    captions = [caption or "" for caption in pq.read_table(world.web_pairs, columns=["caption"])["caption"].to_pylist()]
    images = [str(path.resolve()) for path in sorted((world.human_root / "images").glob("*.png"))]  # all decode
    generation = Generation(root, "bench", 1)
    rng = np.random.default_rng(seed)
    n_images = -(-n_rows // CANDIDATES)
    for first in range(0, n_images, IMAGES_PER_PART):
        shard = f"{first // IMAGES_PER_PART:05d}"
        count = min(IMAGES_PER_PART, n_images - first)
        generation.write_part(MODEL_STAGES[0], shard, _part(first, count, images, captions, rng), {})
        for stage in MODEL_STAGES[1:]:
            generation.mark_done(stage, shard, {"threshold": 0.5} if stage == "filter" else {"top_k": 5})
    generation.write_info(
        generation_info(
            generation.counts(), dataset="bench", number=1, parent=0, stages=list(MODEL_STAGES), config_digest="bench"
        )
    )
    return generation


def _part(first: int, count: int, images: list[str], captions: list[str], rng: np.random.Generator) -> pa.Table:
    """`count` images from number `first` on, CANDIDATES rows each, decided like the filter and the ranker."""
    rows = count * CANDIDATES
    image_numbers = np.repeat(np.arange(first, first + count), CANDIDATES)
    candidate = np.tile(np.arange(CANDIDATES), count)
    picks = rng.integers(len(captions), size=(rows, 2))
    itm = rng.random(rows).astype(np.float32)
    clip = rng.normal(0.3, 0.05, rows).astype(np.float32)
    rank = rng.integers(1, 11, rows)
    filtered = itm < 0.5
    unranked = ~filtered & (rank > 5)
    web = candidate == 0
    return samples_table(
        {
            "image_id": [f"web-{n:09d}" for n in image_numbers],
            "image_ref": [images[n % len(images)] for n in image_numbers],
            "url": [f"http://127.0.0.1/web/w{n:09d}.jpg" if is_web else None for n, is_web in zip(image_numbers, web)],
            "caption": [
                captions[a] if is_web else f"{captions[a]} and {captions[b]}" for (a, b), is_web in zip(picks, web)
            ],
            "caption_source": np.where(web, "web", "synthetic").tolist(),
            "generation": [1] * rows,
            "parent_generation": [0] * rows,
            "itm_score": itm.tolist(),
            "clip_score": clip.tolist(),
            "clip_rank": np.where(filtered, None, rank).tolist(),
            "kept": (~filtered & ~unranked).tolist(),
            "reject_stage": np.where(filtered, "filter", np.where(unranked, "rank", None)).tolist(),
            "reject_reason": np.where(
                filtered, "itm_below_threshold", np.where(unranked, "not_in_top_k", None)
            ).tolist(),
        }
    )


def run_operation(name: str, root: Path, world_dir: Path, batches: int) -> dict[str, Any]:
    """Run one reader on generation `bench` 1 under `root`, in this process; returns its seconds, the peak
    RSS of the process and the RSS after the reader's imports (torch alone maps about 0.7 GB)."""
    generation = Generation(root, "bench", 1)
    world = WorldPaths.at(world_dir)
    if name == "generations":
        from pipelines.cli.main import format_generations

        work = functools.partial(format_generations, root)
    elif name == "assemble":
        from pipelines.stages.assemble import AssembleConfig, run_assemble

        human = AssembleConfig(world.human_annotations, world.human_root)
        work = functools.partial(run_assemble, human, generation, 0, CHECKPOINTS, list(MODEL_STAGES), "bench")
    elif name == "report":
        from pipelines.report.report import write_report

        work = functools.partial(write_report, generation, root / "report")
    elif name == "arm rules":
        from pipelines.stages.ablate import ARMS, derive_arm
        from pipelines.stages.assemble import AssembleConfig

        human = AssembleConfig(world.human_annotations, world.human_root)
        work = functools.partial(derive_arm, generation, ARMS["capfilt_rank"], human, thresholds={"itm": 0.5}, top_k=5)
    elif name == "loader":
        import pipelines.training.data  # noqa: F401  (imported here so that its RSS counts as imports)

        work = functools.partial(_read_batches, generation, root / "pairs.arrow", batches)
    else:
        raise ValueError(f"unknown operation {name!r}; known: {OPERATIONS}")
    imports_mb = _memory_mb("VmRSS")
    seconds = time_once(work)[0]
    return {"seconds": seconds, "peak_rss_mb": _memory_mb("VmHWM"), "imports_mb": imports_mb}


def _memory_mb(field: str) -> float:
    """A memory figure of this process in MB: VmRSS (now) or VmHWM (peak). Unlike getrusage's ru_maxrss,
    VmHWM does not inherit the peak of the process that started this one."""
    kib = process_status_kib(field)
    if kib is None:
        raise RuntimeError(f"bench scale reads {field} from /proc/self/status (Linux)")
    return kib / 1024


def _read_batches(generation: Generation, pair_file: Path, batches: int) -> None:
    """What a training worker does before its first `batches` steps: the pair file, then the batches."""
    from torch.utils.data import DataLoader

    from pipelines.training.data import EpochOrder, PairDataset, collate_captions, generation_triples, write_pairs
    from vlp_core.config import load_preset
    from vlp_core.data import image_transform

    pairs = write_pairs(generation_triples(generation), pair_file, str(generation.path))
    dataset = PairDataset(pairs, generation.path.parent, image_transform(load_preset("tiny"), train=True))
    order = EpochOrder(len(pairs), BATCH_SIZE, rank=0, world_size=1, seed=0, epoch=0)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=order, collate_fn=collate_captions)
    for count, _ in enumerate(loader, start=1):
        if count == batches:
            break


def run(quick: bool = False, repeats: int | None = None, sizes: tuple[int, ...] | None = None) -> Report:
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    batches = QUICK_LOADER_BATCHES if quick else LOADER_BATCHES
    report = Report("scale", quick, machine())
    report.notes += [
        f"a synthetic generation of N rows ({CANDIDATES} candidates per image, {IMAGES_PER_PART * CANDIDATES:,} "
        f"rows per part); each reader in a fresh process; loader: pair file + first {batches} batches of "
        f"{BATCH_SIZE}; one run per size (repeats ignored)",
    ]
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in OPERATIONS}
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-scale-") as folder:
        world_dir = Path(folder) / "world"
        for n_rows in sizes:
            root = Path(folder) / f"rows-{n_rows}"
            start = time.perf_counter()
            build_generation(root, world_dir, n_rows)
            parquet_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
            report.figures[f"{n_rows:,} rows: built in"] = f"{time.perf_counter() - start:.1f} s, {parquet_mb:.0f} MB"
            for name in OPERATIONS:
                load_before = load_1min()
                result = results[name][n_rows] = _in_fresh_process(name, root, world_dir, batches)
                measurement = Measurement(
                    f"{name} at {n_rows:,} rows",
                    "rows/s",
                    n_rows,
                    [result["seconds"]],
                    load_before,
                    load_1min(),
                    {"peak RSS MB": round(result["peak_rss_mb"]), "RSS after imports MB": round(result["imports_mb"])},
                )
                report.measurements.append(measurement)
                print(*measurement.lines(), sep="\n", flush=True)
    small, large = min(sizes), max(sizes)
    for name in OPERATIONS:
        a, b = results[name][small], results[name][large]
        report.figures[f"{name}: {large // small}x the rows"] = (
            f"{b['seconds'] / a['seconds']:.2f}x the time, {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x the peak RSS"
        )
    return report


def _in_fresh_process(name: str, root: Path, world_dir: Path, batches: int) -> dict[str, Any]:
    code = (
        "import json, sys; from pathlib import Path; from benchmarks.scale import run_operation; "
        f"print(json.dumps(run_operation({name!r}, Path({str(root)!r}), Path({str(world_dir)!r}), {batches})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench scale: {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
