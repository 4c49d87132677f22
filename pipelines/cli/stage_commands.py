"""`capfilt` subcommands of the model stages: training, caption, filter, rank, assemble, evaluate, and
the dataset-quality report.

Each parses flags into the stage's config dataclass (which validates them before any work) and calls
the stage function. Generations are named by `--root`, `--dataset` and a generation number.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

from pipelines.cli.options import config_default, config_kwargs, config_option
from pipelines.executor import EXECUTORS
from pipelines.manifests.manifest import Generation
from pipelines.registry import CAPTION, FILTER, MODEL_STAGES, RANK
from vlp_core.storage import location

CAPTION_CONFIG, FILTER_CONFIG, RANK_CONFIG = CAPTION.config, FILTER.config, RANK.config
EVALUATE_CONFIG = "pipelines.stages.evaluate:EvaluateConfig"
TRAIN_CONFIG = "pipelines.training.config:TrainConfig"

Commands = argparse._SubParsersAction  # what add_subparsers() returns


def add_stage_commands(commands: Commands, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    command = functools.partial(add_command, commands)

    pretrain = command("pretrain", _pretrain, "Pretrain BLIP (ITC + ITM + LM) on a generation's kept pairs.")
    _generation_options(pretrain)
    _training_options(pretrain)

    finetune = command(
        "finetune",
        _finetune,
        "Fine-tune a captioner (LM) or a filter (ITC + ITM), or train the "
        "CLIP ranker, on a COCO Karpathy set (Ray Train).",
    )
    finetune.add_argument("role", choices=["captioner", "filter", "clip"])
    finetune.add_argument("--annotations", type=location, required=True, help="COCO Karpathy json")
    finetune.add_argument("--image-root", type=location, required=True, help="folder the json's image paths are under")
    _training_options(finetune)

    importing = command(
        "import-hf",
        _import_hf,
        "Convert a transformers BLIP folder (BlipForConditionalGeneration: a captioner; BlipForImageTextRetrieval: "
        "a filter) into a capfilt checkpoint once, so that a cluster job's actors do not each convert it. Every "
        "command that takes a checkpoint also takes such a folder as it is.",
    )
    importing.add_argument("source", type=location, help="the transformers folder (as save_pretrained writes it)")
    importing.add_argument("destination", type=location, help="the capfilt checkpoint folder to write")

    caption = command(
        "caption",
        _caption,
        "Write K nucleus-sampled captions per web image of generation 0 into a new generation (Ray Data actor "
        "pool), with capfilt's BLIP or a released BLIP-2, InstructBLIP, LLaVA or CoCa.",
    )
    _generation_options(caption)
    caption.add_argument(
        "--checkpoint",
        type=location,
        required=True,
        help="the captioner's folder: for blip a capfilt checkpoint or a transformers BlipForConditionalGeneration "
        "folder; for blip2 / instructblip / llava a transformers folder (model and processor, as save_pretrained "
        "writes them); for coca an open_clip folder (open_clip_config.json and weights)",
    )
    option = functools.partial(config_option, caption, config=CAPTION_CONFIG)
    option("--backend", help="the captioner: blip (capfilt's own), blip2, instructblip, llava or coca")
    option("--prompt", help="the text the captioner is given before the caption (LLaVA: the user's turn)")
    option("--num-captions", type=int, help="K, synthetic captions per image")
    option("--top-p", type=float, help="nucleus sampling mass")
    option("--max-length", type=int, help="caption tokens after the prompt, [SEP] included")
    option("--min-length", type=int, help="caption tokens after the prompt before [SEP] may come")
    option("--seed", type=int, help="with the image id, seeds each image's captions")
    _pool_options(caption, CAPTION_CONFIG)

    filtering = command(
        "filter",
        _filter,
        "Score every web and synthetic caption with the filter's ITM head (or, with --scorer clip, a CLIP's cosine "
        "similarity) and keep those that reach the threshold; --rethreshold re-decides from stored scores.",
    )
    _generation_options(filtering)
    config_option(filtering, "--scorer", FILTER_CONFIG, choices=["itm", "clip"], help="what scores a caption")
    filtering.add_argument(
        "--checkpoint",
        type=location,
        help="the itm scorer's filter: a capfilt checkpoint or a transformers BlipForImageTextRetrieval folder (its "
        "ITM head reads [ENC] in column 0, as BLIP's; not needed with --rethreshold)",
    )
    _clip_options(filtering, "the clip scorer's", required=False)
    config_option(
        filtering,
        "--threshold",
        FILTER_CONFIG,
        type=float,
        help="the score a caption needs: an ITM match probability in [0, 1], or a CLIP cosine similarity in [-1, 1]",
    )
    config_option(
        filtering,
        "--best-per-image",
        FILTER_CONFIG,
        type=int,
        help="keep only each image's N best-scored captions of those that reach the threshold; 0: all",
    )
    filtering.add_argument("--rethreshold", action="store_true", help="re-decide from stored scores, no model")
    _pool_options(filtering, FILTER_CONFIG)

    ranking = command("rank", _rank, "CLIP-score the surviving candidates of each image and keep the top-k.")
    _generation_options(ranking)
    _clip_options(ranking, "the ranker's", required=True)
    config_option(ranking, "--top-k", RANK_CONFIG, type=int, help="captions kept per image")
    _pool_options(ranking, RANK_CONFIG)

    assembling = command("assemble", _assemble, "Add the human-annotated pairs and write generation.json.")
    _generation_options(assembling)
    assembling.add_argument("--annotations", type=location, required=True, help="human COCO Karpathy json")
    assembling.add_argument("--image-root", type=location, required=True)
    assembling.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="ROLE=DIGEST",
        help="a model that built this generation, e.g. captioner=sha256:... (repeatable)",
    )

    evaluating = command(
        "evaluate",
        _evaluate,
        "Retrieval R@1/5, caption metrics and, on a world, filter "
        "precision/recall; stored as the generation's evaluation.json.",
    )
    _generation_options(evaluating)
    evaluating.add_argument("--checkpoint", type=location, required=True, help="model checkpoint folder")
    evaluating.add_argument("--test-annotations", type=location, required=True, help="held-out COCO Karpathy json")
    evaluating.add_argument("--test-image-root", type=location, required=True)
    evaluating.add_argument("--world", type=location, help="the synthetic world, for its ground-truth metrics")
    config_option(evaluating, "--k-test", EVALUATE_CONFIG, type=int, help="ITC candidates re-ranked by ITM")
    add_executor_options(evaluating)

    reporting = command(
        "report",
        _write_report,
        "Write a generation's dataset-quality report: index.html (opens from disk), report.json and the plots.",
    )
    _generation_options(reporting)
    reporting.add_argument("--out", type=location, help="report folder (default: <generation>/report)")
    reporting.add_argument(
        "--world",
        type=location,
        help="the synthetic world, for its ground truth (default: the "
        "world the generation's evaluation.json names, if any)",
    )


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=location, default=location("data_manifests"), help="manifest root")
    parser.add_argument("--dataset", default="web")
    parser.add_argument(
        "--generation",
        type=int,
        required=True,
        help="the generation to read (pretrain, evaluate) or to build (caption, filter, rank, assemble)",
    )


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=location, required=True, help="checkpoints go here; a rerun resumes")
    parser.add_argument("--preset", help="vlp_core model preset to start from random weights (e.g. tiny)")
    parser.add_argument("--init-checkpoint", type=location, help="capfilt or transformers BLIP folder to start from")
    option = functools.partial(config_option, parser, config=TRAIN_CONFIG)
    option("--max-steps", type=int, help="train this many steps (or give --epochs)")
    option("--epochs", type=int, help="train this many passes over the pairs (or give --max-steps)")
    option("--batch-size", type=int, help="pairs per step and worker")
    option("--lr", type=float, help="peak learning rate")
    option("--warmup-steps", type=int, help="learning-rate warm-up")
    option("--itc-warmup-steps", type=int, help="BLIP: train ITC alone for the first steps")
    option("--easy-negative-steps", type=int, help="BLIP: ramp ITM negatives from uniform to ITC-hard over these steps")
    option("--workers", dest="num_workers", type=int, help="Ray Train workers (DDP when > 1)")
    option("--cpus-per-worker", type=int, help="CPU cores (torch threads) per worker")
    option("--gpu", dest="use_gpu", action="store_true", help="one GPU per worker")
    add_executor_options(parser)


def _clip_options(parser: argparse.ArgumentParser, whose: str, required: bool) -> None:
    parser.add_argument(
        "--clip-model", default="clip_tiny", help=f"{whose} open_clip architecture (default: %(default)s)"
    )
    parser.add_argument(
        "--clip-checkpoint", type=location, required=required, help=f"{whose} CLIP weights (.safetensors)"
    )


def _pool_options(parser: argparse.ArgumentParser, config: str) -> None:
    option = functools.partial(config_option, parser, config=config)
    option("--batch-size", type=int, help="images per model call (default: 32 on a CPU, 256 on a GPU)")
    option("--concurrency", type=int, help="Ray actors, each holding the model")
    option("--gpus-per-actor", dest="num_gpus", type=float, help="GPUs per actor; 0 runs on the CPU")
    add_executor_options(parser)


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """Where the work runs: --executor and --ray-address."""
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="ray: Ray actors, tasks and Ray Train (local Ray or a cluster); local: in this process, "
        "one model at a time (default: $CAPFILT_EXECUTOR, else ray)",
    )
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")


def _generation(args: argparse.Namespace, number: int | None = None) -> Generation:
    return Generation(args.root, args.dataset, args.generation if number is None else number)


def _train_config(args: argparse.Namespace):
    from pipelines.training.config import TrainConfig

    return TrainConfig(**config_kwargs(args, TrainConfig))


def _report(result) -> None:
    print(f"checkpoint: {result.checkpoint_dir} ({result.digest}, {result.steps} steps)")


def _pretrain(args: argparse.Namespace) -> None:
    from pipelines.training.stages import pretrain

    _report(pretrain(_train_config(args), _generation(args), args.run_dir))


def _finetune(args: argparse.Namespace) -> None:
    from pipelines.training import stages

    entry = {"captioner": stages.finetune_captioner, "filter": stages.finetune_filter, "clip": stages.train_clip}
    _report(entry[args.role](_train_config(args), args.annotations, args.image_root, args.run_dir))


def _import_hf(args: argparse.Namespace) -> None:
    from vlp_core.checkpoint import checkpoint_parts, convert_hf

    digest = convert_hf(args.source, args.destination)
    parts = ", ".join(f"{part} {state}" for part, state in checkpoint_parts(args.destination).items())
    print(f"checkpoint: {args.destination} ({digest}); parts: {parts}")


def _caption(args: argparse.Namespace) -> None:
    from pipelines.stages.caption import CaptionConfig, run_caption

    config = CaptionConfig(**config_kwargs(args, CaptionConfig))
    counts = run_caption(config, _generation(args, 0), _generation(args))
    print(f"caption: {counts['rows']} rows in {_generation(args).path}")


def _filter(args: argparse.Namespace) -> None:
    from pipelines.stages.filter import FilterConfig, rethreshold, run_filter

    if args.rethreshold:
        threshold = args.threshold if args.threshold is not None else config_default(FILTER_CONFIG, "threshold")
        counts = rethreshold(_generation(args), threshold, args.best_per_image)
    elif args.checkpoint is None and args.clip_checkpoint is None:
        raise ValueError(
            "filter: give --checkpoint (the filter model), --scorer clip --clip-checkpoint (a CLIP's weights), or "
            "--rethreshold to re-decide stored scores"
        )
    else:
        counts = run_filter(FilterConfig(**config_kwargs(args, FilterConfig)), _generation(args))
    print(f"filter: {counts['kept']} of {counts['rows']} rows kept")


def _rank(args: argparse.Namespace) -> None:
    from pipelines.stages.rank import RankConfig, run_rank

    config = RankConfig(**config_kwargs(args, RankConfig))
    counts = run_rank(config, _generation(args))
    print(f"rank: {counts['kept']} of {counts['rows']} rows kept")


def _assemble(args: argparse.Namespace) -> None:
    from pipelines.manifests.manifest import config_digest
    from pipelines.stages.assemble import AssembleConfig, run_assemble

    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    config = AssembleConfig(human_annotations=args.annotations, human_image_root=args.image_root)
    counts = run_assemble(
        config,
        _generation(args),
        args.generation - 1,
        checkpoints,
        stages=[stage for stage in MODEL_STAGES if (_generation(args).path / "markers" / stage).is_dir()],
        config_digest=config_digest(vars(config)),
    )
    print(f"assemble: generation {args.generation} has {counts['rows']} rows")


def _evaluate(args: argparse.Namespace) -> None:
    from pipelines.stages.evaluate import EvaluateConfig, run_evaluate

    config = EvaluateConfig(world_dir=args.world, **config_kwargs(args, EvaluateConfig))
    print(json.dumps(run_evaluate(config, _generation(args)), indent=2, default=str))


def _write_report(args: argparse.Namespace) -> None:
    from pipelines.report.report import write_report

    print(f"report: {write_report(_generation(args), args.out, args.world)}")
