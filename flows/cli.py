"""The `capfilt` console script: the stage commands of `pipelines.cli.main` plus the flow commands."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Mapping
from typing import Any

from benchmarks.cli import add_bench_command
from pipelines.cli.console import LOG_FILE, command_console
from pipelines.cli.main import (
    Commands,
    add_command,
    add_download_options,
    download_options,
    format_generations,
    text_table,
)
from pipelines.cli.main import main as pipelines_main
from pipelines.cli.options import config_default, config_kwargs, config_option
from pipelines.cli.stage_commands import add_executor_options
from vlp_core.storage import Location, location

RUN_FLOW = "flows.capfilt:capfilt"
ABLATE_FLOW = "flows.ablate:capfilt_ablate"


def add_flow_commands(commands: Commands) -> None:
    run = add_command(
        commands, "run", _run, "Run the whole bootstrapping loop as a Prefect flow; --preset tiny needs no input."
    )
    _add_run_options(run, RUN_FLOW)
    config_option(run, "--rounds", RUN_FLOW, type=int, help="CapFilt rounds (default: the preset's)")

    ablate = add_command(
        commands,
        "ablate",
        _ablate,
        "BLIP's Table 1 ablation: train and evaluate no CapFilt / filter only / captioner only / "
        "CapFilt (/ + CLIP rank) on the same candidates and budget, over several seeds; prints the "
        "table. Without --url-list it runs on a synthetic world.",
    )
    _add_run_options(ablate, ABLATE_FLOW)
    option = functools.partial(config_option, ablate, config=ABLATE_FLOW)
    option(
        "--arms",
        type=_names,
        help="comma-separated arms (default: BLIP's Table 1, no_capfilt,filter_only,captioner_only,capfilt,"
        "capfilt_rank; also filter_only_clip and capfilt_clip: those filters decided by a CLIP-score cut at "
        "--clip-threshold on the same candidates)",
    )
    option("--seeds", type=_integers, help="comma-separated pretraining seeds (default: 0,1,2)")
    option(
        "--compare-captioner-backend",
        help="compare captioners: the other one's backend (blip, blip2, instructblip, llava, coca); the arms "
        "with synthetic captions also run with its captions, as ARM_BACKEND",
    )
    option("--compare-captioner-checkpoint", help="compare captioners: the other one's folder")
    option("--compare-caption-prompt", help="compare captioners: the other one's prompt (default: its backend's)")
    option("--pretrain-steps", type=int, help="pretraining budget of every model, in steps (default: the preset's)")
    option("--batch-size", type=int, help="training batch size per worker (default: the preset's)")
    option("--model-preset", help="BLIP size: tiny, base or large (default: the run preset's)")

    deploy = add_command(
        commands,
        "deploy",
        _deploy,
        "Serve the flow's deployments (capfilt/nightly on a cron schedule, capfilt/on-demand) "
        "on the Prefect server at PREFECT_API_URL until Ctrl-C.",
    )
    deploy.add_argument("--cron", default="0 2 * * *", help="schedule of capfilt/nightly (default: %(default)s)")
    deploy.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="default flow parameter, e.g. url_list='\"/data/urls.parquet\"' or rounds=2 "
        "(repeatable; see the capfilt flow's parameters)",
    )


def _add_run_options(parser: argparse.ArgumentParser, flow: str) -> None:
    """The options `run` and `ablate` share: preset, run folder, CapFilt knobs, inputs (a world's size or real
    data), given models, executor. Each sets the flow parameter of its name; the flow's signature holds the
    defaults."""
    option = functools.partial(config_option, parser, config=flow)
    option("--preset", help="run preset")
    option("--out", dest="out_dir", help="run folder")
    option("--num-captions", type=int, help="synthetic captions per image, K (default: the preset's)")
    option("--scorer", dest="filter_scorer", choices=["itm", "clip"], help="the filter's scorer (default: itm)")
    option(
        "--threshold",
        dest="itm_threshold",
        type=float,
        help="the itm scorer's: ITM match probability a caption needs to be kept (default: the preset's)",
    )
    option(
        "--clip-threshold",
        type=float,
        help="the clip scorer's: CLIP cosine similarity a caption needs to be kept (default: 0.28)",
    )
    option(
        "--best-per-image",
        type=int,
        help="the filter keeps only each image's N best-scored passing captions; 0: all (default: the preset's)",
    )
    option("--top-k", type=int, help="captions kept per image after CLIP ranking (default: the preset's)")
    option("--n-web", type=int, help="web pairs of the synthetic world (default: the preset's)")
    option(
        "--n-test",
        type=int,
        help="held-out images of the synthetic world (default: the preset's; for ablate its ablation_n_test, "
        "500 for tiny)",
    )
    option(
        "--gpus",
        dest="num_gpus",
        type=float,
        help="GPUs per inference actor, evaluation task and training worker (default: 0)",
    )
    option("--inference-batch-size", type=int, help="images per model call (default: 32 on a CPU, 256 on a GPU)")
    option(
        "--train-cpus",
        type=int,
        help="CPU cores of a training; the captioner's and the filter's fine-tunings share them, side by side "
        "(default: the preset's)",
    )
    option("--url-list", help="real data: img2dataset URL list (Parquet/CSV with url, caption)")
    option("--human-annotations", help="with --url-list: COCO Karpathy json of the human pairs")
    option("--human-image-root", help="with --url-list: the folder its image paths are under")
    option(
        "--test-annotations",
        help="with --url-list: COCO Karpathy json of the held-out set (not needed when nothing is trained)",
    )
    option("--test-image-root", help="with --url-list: the folder its image paths are under")
    option("--clip-model", help="open_clip architecture of the ranker, e.g. ViT-B-32 (default: the run preset's)")
    option("--clip-checkpoint", help="open_clip weights of the ranker (default: train one here)")
    option(
        "--captioner-checkpoint",
        help="a captioner to use, e.g. a released transformers "
        "BlipForConditionalGeneration folder (default: fine-tune one here)",
    )
    option(
        "--captioner-backend",
        help="the given captioner's kind: blip (default), blip2, instructblip, llava or coca (a transformers "
        "folder; for coca an open_clip one)",
    )
    option("--caption-prompt", help="the text the captioner is given (default: the backend's)")
    option(
        "--filter-checkpoint",
        help="a filter to use, e.g. a released transformers BlipForImageTextRetrieval "
        "folder (default: fine-tune one here); with --captioner-checkpoint too, nothing is trained",
    )
    add_download_options(parser)
    add_executor_options(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print every log line (Ray, Prefect, img2dataset, ...) on the terminal too; "
        f"otherwise they go only to RUN_FOLDER/{LOG_FILE}",
    )


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
    from flows.prefect_server import prefect_api
    from pipelines.report.report import REPORT_JSON

    with command_console(_run_folder(args, RUN_FLOW), verbose=args.verbose) as log_file, prefect_api():
        result = capfilt(**config_kwargs(args, capfilt), download_options=download_options(args) or None)
    root = location(result["manifests"])
    print(format_generations(root, rejects=False))
    print(f"why rows were dropped: capfilt generations --root {root} --reasons; capfilt explain URL --root {root}")
    if result["metrics"]:
        print(f"\nheld-out metrics (change from the generation before):\n{format_metrics(result['metrics'])}")
    print(f"\nmanifests: {root}\nevaluations: {root}/*/gen-*/evaluation.json\nlog: {log_file}")
    for number, page in result["reports"].items():
        verdict = json.loads((location(page).parent / REPORT_JSON).read_text()).get("verdict") or {}
        print(f"report of generation {number}: {page}\n  {verdict.get('summary', '')}")


METRIC_KEYS = (("retrieval", "tr@1"), ("retrieval", "ir@1"), ("captioning", "bleu_4"), ("captioning", "cider"))


def format_metrics(metrics: Mapping[int, Mapping[str, Any]]) -> str:
    """A short table of each generation's held-out metrics (its evaluation.json), with the change from the
    generation before."""
    rows, previous = [("generation", *(key for _, key in METRIC_KEYS))], None
    for number in sorted(metrics):
        values = {key: (metrics[number].get(group) or {}).get(key) for group, key in METRIC_KEYS}
        cells = [str(number)]
        for key, value in values.items():
            before = (previous or {}).get(key)
            change = f" ({value - before:+.3f})" if value is not None and before is not None else ""
            cells.append("-" if value is None else f"{value:.3f}{change}")
        rows.append(tuple(cells))
        previous = values
    return "\n".join(text_table(rows, indent="  "))


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _integers(text: str) -> list[int]:
    try:
        return [int(value) for value in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ablate(args: argparse.Namespace) -> None:
    from flows.ablate import capfilt_ablate
    from flows.prefect_server import prefect_api

    with command_console(_run_folder(args, ABLATE_FLOW), verbose=args.verbose) as log_file, prefect_api():
        result = capfilt_ablate(**config_kwargs(args, capfilt_ablate), download_options=download_options(args) or None)
    print(location(result["table"]).read_text())
    print(f"table: {result['table']} (and ablation.json beside it)\nreport: {result['report']}\nlog: {log_file}")


def _run_folder(args: argparse.Namespace, flow: str) -> Location:
    return location(args.out_dir or config_default(flow, "out_dir"))


def main(argv: list[str] | None = None) -> int:
    """The `capfilt` console script. `pipelines_main` sets the offline environment before anything else; the
    flow and bench commands import Prefect and the models only in their handlers, after it."""
    return pipelines_main(argv, add_flow_commands, add_bench_command)


if __name__ == "__main__":
    sys.exit(main())
