"""Download: our download stage vs raw img2dataset, on the same URL list from the loopback world server.

Raw img2dataset gets the options our stage passes it (webdataset output, resize, threads, sha256).
Our stage adds the URL policy (every host resolved and checked), the pinned input list, one manifest
part per shard with a reason for every failure, completion markers and generation.json. Each
repetition writes into a fresh folder. Goal: at most 10 % overhead (ours/baseline speed >= 0.91).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from benchmarks.harness import Report, compare, machine
from pipelines.manifests.manifest import Generation
from pipelines.stages.download import LOOPBACK, DownloadConfig, download, img2dataset_options
from pipelines.world.generate import WorldConfig, make_world
from pipelines.world.server import WorldServer

URLS, QUICK_URLS = 2000, 100
SLOW_SECONDS = 0.1  # the world's `slow` URLs; the default 2 s would make the timings mostly waiting


def raw_img2dataset(url_list: Path, output_folder: Path, config: DownloadConfig) -> None:
    """What a user of img2dataset would run by hand, with the options our stage uses."""
    from img2dataset import download as img2dataset_download

    img2dataset_download(
        url_list=str(url_list),
        output_folder=str(output_folder),
        disallowed_header_directives=[],
        **img2dataset_options(config),
    )


def run(quick: bool = False, repeats: int | None = None) -> Report:
    repeats = repeats or (1 if quick else 5)
    n_urls = QUICK_URLS if quick else URLS
    config = DownloadConfig(allowed_networks=(LOOPBACK,))
    report = Report(
        "download",
        quick,
        machine(),
        notes=[
            f"{n_urls} URLs of a synthetic world (with its broken URLs: 404, corrupt, HTML, slow {SLOW_SECONDS} s) "
            f"served on 127.0.0.1; {config.threads} threads, {config.processes} process, "
            f"{config.samples_per_shard} samples per shard",
            "baseline: raw img2dataset.download; ours: pipelines.stages.download.download (URL policy, manifest parts, "
            "markers)",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-download-") as folder:
        root = Path(folder)
        world = make_world(root / "world", WorldConfig(n_web=n_urls, n_human=0, n_test=0, slow_seconds=SLOW_SECONDS))
        runs, ours_runs = itertools.count(), []

        def ours() -> None:
            ours_runs.append(Generation(root / f"ours-{next(runs)}", "web", 0))
            download(config, url_list, ours_runs[-1])

        with WorldServer(world.root) as server:
            url_list = server.write_url_list(root / "urls.parquet")
            rows = compare(
                f"{n_urls} URLs",
                "URLs/s",
                n_urls,
                lambda: raw_img2dataset(url_list, root / f"raw-{next(runs)}", config),
                ours,
                repeats,
                warmup=not quick,
            )
        report.comparisons.append(rows)
        counts = ours_runs[-1].counts()
    report.figures["rows in our manifest"] = counts["rows"]
    report.figures["downloaded (kept) rows"] = counts["kept"]
    overhead = 1 / rows.summary()["ratio"]["median"] - 1
    report.figures["overhead of ours, median (goal <= 10 %)"] = f"{100 * overhead:.1f} %"
    return report
