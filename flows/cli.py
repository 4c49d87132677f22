"""The `capfilt` console script: the stage commands of `pipelines.cli` plus the flow commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.cli import add_bench_command
from pipelines.cli import Commands, add_command, format_generations
from pipelines.cli import main as pipelines_main


def add_flow_commands(commands: Commands) -> None:
    run = add_command(commands, "run", _run,
                      "Run the whole bootstrapping loop as a Prefect flow; --preset tiny needs no input.")
    run.add_argument("--preset", default="tiny", help="run preset (default: %(default)s)")
    run.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder (default: %(default)s)")
    run.add_argument("--rounds", type=int, help="CapFilt rounds (default: the preset's)")
    run.add_argument("--num-captions", type=int, help="synthetic captions per image, K")
    run.add_argument("--threshold", type=float, help="ITM match probability a caption needs to be kept")
    run.add_argument("--top-k", type=int, help="captions kept per image after CLIP ranking")
    run.add_argument("--n-web", type=int, help="web pairs of the synthetic world (default: the preset's)")
    run.add_argument("--ray-address", help="an existing Ray cluster (default: $RAY_ADDRESS, else local)")


    deploy = add_command(commands, "deploy", _deploy,
                         "Serve the flow's deployments (capfilt/nightly on a cron schedule, capfilt/on-demand) "
                         "on the Prefect server at PREFECT_API_URL until Ctrl-C.")
    deploy.add_argument("--cron", default="0 2 * * *", help="schedule of capfilt/nightly (default: %(default)s)")
    deploy.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="default flow parameter, e.g. url_list='\"/data/urls.parquet\"' or rounds=2 "
                        "(repeatable; see the capfilt flow's parameters)")


def _deploy(args: argparse.Namespace) -> None:
    from flows.deploy import serve_deployments

    serve_deployments(_parse_params(args.param), cron=args.cron)


def _parse_params(items: list[str]) -> dict[str, object]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value  # a bare string such as a path
    return params


def _run(args: argparse.Namespace) -> None:
    from flows.capfilt import capfilt

    result = capfilt(out_dir=str(args.out), preset=args.preset, rounds=args.rounds, num_captions=args.num_captions,
                     itm_threshold=args.threshold, top_k=args.top_k, n_web=args.n_web, ray_address=args.ray_address)
    root = Path(result["manifests"])
    print(format_generations(root))
    print(json.dumps(result["metrics"], indent=2, default=str))
    print(f"\nmanifests: {root}\nevaluations: {root}/*/gen-*/evaluation.json")


def main(argv: list[str] | None = None) -> int:
    return pipelines_main(argv, add_flow_commands, add_bench_command)


if __name__ == "__main__":
    sys.exit(main())
