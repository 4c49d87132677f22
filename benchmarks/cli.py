"""`capfilt bench NAME [--quick]`: run one benchmark, or all, print their reports, optionally save JSON."""

from __future__ import annotations

import argparse
import importlib

from benchmarks.harness import Report, save_reports
from pipelines.cli.main import Commands, add_command
from vlp_core.storage import location

# benchmark name -> module with `run(quick, repeats, **options) -> Report`
BENCHMARKS = {
    "caption": "benchmarks.caption",
    "scoring": "benchmarks.scoring",
    "training": "benchmarks.training",
    "download": "benchmarks.download",
    "end-to-end": "benchmarks.end_to_end",
    "scale": "benchmarks.scale",
    "revision": "benchmarks.revision",
}


def add_bench_command(commands: Commands) -> None:
    """Add `bench` to the `capfilt` command (an extension of `pipelines.cli.main.main`)."""
    help_text = (
        "Benchmark a part of the pipeline against its obvious alternative, measured side by side "
        "(alternating runs, min/median/max); `all` runs every benchmark."
    )
    bench = add_command(commands, "bench", _bench, help_text)
    bench.add_argument("name", choices=[*BENCHMARKS, "all"])
    bench.add_argument("--quick", action="store_true", help="small sizes, one repetition: checks that it runs")
    bench.add_argument("--repeats", type=int, help="timed repetitions of each side (default: 5, quick: 1)")
    bench.add_argument(
        "--checkpoint",
        type=location,
        help="caption: the captioner's folder (blip default: the tiny preset, briefly trained here)",
    )
    bench.add_argument(
        "--backend",
        default="blip",
        help="caption: the captioner backend, blip (against transformers' BLIP), blip2, instructblip, llava or coca "
        "(against the model's own sampler; these need --checkpoint) (default: %(default)s)",
    )
    bench.add_argument("--preset", help="end-to-end: run preset (default: tiny, quick: smoke)")
    bench.add_argument(
        "--rows", type=int, nargs="+", help="scale: generation sizes in rows (default: 1000000 10000000)"
    )
    bench.add_argument(
        "--base",
        default="HEAD",
        help="revision: the git revision whose vlp_core is the baseline (default: %(default)s)",
    )
    bench.add_argument("--json", type=location, help="also write the reports to this JSON file")


def run_benchmark(name: str, args: argparse.Namespace) -> Report:
    module = BENCHMARKS[name]
    options = {"checkpoint": args.checkpoint} if name == "caption" else {}
    if name == "caption" and args.backend != "blip":  # another backend against the model's own sampler
        module, options["backend"] = "benchmarks.caption_backends", args.backend
    if name == "end-to-end" and args.preset:
        options["preset"] = args.preset
    if name == "scale" and args.rows:
        options["sizes"] = tuple(args.rows)
    if name == "revision":
        options["base"] = args.base
    return importlib.import_module(module).run(quick=args.quick, repeats=args.repeats, **options)


def _bench(args: argparse.Namespace) -> None:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    reports = []
    for name in BENCHMARKS if args.name == "all" else [args.name]:
        reports.append(run_benchmark(name, args))
        print(reports[-1].text(), flush=True)
        if args.json:
            save_reports(reports, args.json)  # after each benchmark, so a long run keeps what it measured
