"""The `capfilt` command line: one subcommand per stage, each a thin call of a pipelines function."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from pipelines.cli.console import LOG_FORMAT
from pipelines.cli.options import ConfigDefaultsHelpFormatter, config_kwargs, config_option
from pipelines.cli.stage_commands import add_stage_commands
from pipelines.manifests.images import ShardUnavailableError
from pipelines.manifests.manifest import Generation, ManifestError, list_generations
from pipelines.registry import DOWNLOAD
from pipelines.stopping import Stopped, stopping_cleanly_on_signals
from vlp_core.storage import Location, location

DEFAULT_ROOT = location("data_manifests")
WORLD_CONFIG = "pipelines.world.generate:WorldConfig"
DOWNLOAD_CONFIG = DOWNLOAD.config

# Offline by default: no model hub, no telemetry. Users with a hub mirror can override these.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client: no telemetry, and no notice about it on an interactive terminal
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a busy 2-core machine is slow to start it
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines,vlp_core",  # stage logs show in Prefect's flow-run logs
}

Commands = argparse._SubParsersAction  # what add_subparsers() returns


def set_offline_environment() -> None:
    """Set OFFLINE_ENVIRONMENT's variables that the user has not set. Hugging Face, Ray and Prefect read
    them when they are imported or started, so this runs before any of them: first thing in `main`
    (every command imports them lazily, in its handler)."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None, *extensions: Callable[[Commands], None]) -> int:
    """Run the `capfilt` command; `extensions` add subcommands (the flows layer adds `run`)."""
    set_offline_environment()
    parser = build_parser(*extensions)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_library_info_on_root)
    try:
        with stopping_cleanly_on_signals():
            args.handler(args)
    except Stopped as stopped:
        logging.disable()  # the threads that waited on the terminated children end now, quietly
        print(f"capfilt {args.command}: stopped by {stopped.signal_name}; running it again resumes", file=sys.stderr)
        return stopped.code
    except Exception as error:
        found = input_error(error)
        if found is None:
            raise
        print(f"capfilt {args.command}: error: {found}", file=sys.stderr)
        return 2
    return 0


QUIET_LOGGERS = (  # their INFO: a line per request of Prefect's client, or per credential lookup of S3's
    "httpx",
    "httpcore",
    "aiobotocore",
    "botocore",
)
ROOT_LOGGING_LIBRARIES = ("open_clip",)  # they log their INFO chatter on the root logger (10 lines per model)


def _library_info_on_root(record: logging.LogRecord) -> bool:
    """Keep a record unless it is INFO (or below) that a library logged on the root logger."""
    from_library = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ROOT_LOGGING_LIBRARIES)
    return not (record.name == "root" and record.levelno < logging.WARNING and from_library)


INPUT_ERRORS = (ManifestError, ValueError, FileNotFoundError, ShardUnavailableError)


def input_error(error: BaseException) -> BaseException | None:
    """The error a user can act on (bad input, settings or a missing file) that `error` is or wraps: a Ray
    task or Ray Data actor re-raises the original inside its own error, with the remote traceback in its
    message. None for anything else (a bug: the traceback is wanted then)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        original = getattr(error, "cause", None)  # where Ray keeps the exception the task raised
        if isinstance(original, BaseException):
            error = original
        elif isinstance(error, INPUT_ERRORS):
            return error
        else:
            error = error.__cause__
    return None


def add_command(
    commands: Commands, name: str, handler: Callable[[argparse.Namespace], None], help: str
) -> argparse.ArgumentParser:
    """A subcommand whose `handler(args)` runs it."""
    sub = commands.add_parser(name, help=help, description=help, formatter_class=ConfigDefaultsHelpFormatter)
    sub.set_defaults(handler=handler)
    return sub


def build_parser(*extensions: Callable[[Commands], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = functools.partial(add_command, commands)

    world = command("world", _world, "Make a synthetic web world (images, noisy alt-texts, COCO-format sets).")
    world.add_argument("--out", type=location, required=True, help="folder to write the world into")
    _add_world_options(world)

    serve = command("serve-world", _serve_world, "Serve a world's web images on 127.0.0.1 until Ctrl-C.")
    serve.add_argument("world_dir", type=location)
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    serve.add_argument(
        "--url-list", type=location, help="where to write the URL list (default: WORLD/web/urls.parquet)"
    )

    download = command("download", _download, "Download a URL list with img2dataset into a generation-0 manifest.")
    source = download.add_mutually_exclusive_group(required=True)
    source.add_argument("--url-list", type=location, help="Parquet or CSV with columns url[, caption]")
    source.add_argument("--world", type=location, help="a world folder: serve it on 127.0.0.1 and download it")
    _add_manifest_options(download)
    add_download_options(download)

    generations = command("generations", _generations, "List generations with counts by source and reject reason.")
    generations.add_argument("--root", type=location, default=DEFAULT_ROOT, help="manifest root (default: %(default)s)")
    generations.add_argument(
        "--reasons", action="store_true", help="also the funnel: rows of each source left after each stage"
    )

    explain = command(
        "explain",
        _explain,
        "What happened to one sample: its candidate captions in every generation, with each decision and reason.",
    )
    explain.add_argument("sample", help="the sample's URL, image id, or the sample id of one of its rows")
    explain.add_argument("--root", type=location, default=DEFAULT_ROOT, help="manifest root (default: %(default)s)")
    explain.add_argument("--dataset", default="web", help="dataset folder under the root (default: %(default)s)")

    add_stage_commands(commands, add_command)
    for extend in extensions:
        extend(commands)
    return parser


def _add_world_options(parser: argparse.ArgumentParser) -> None:
    option = functools.partial(config_option, parser, config=WORLD_CONFIG)
    option("--seed", type=int, help="the world's random seed")
    option("--n-web", type=int, help="web image-text pairs")
    option("--n-human", type=int, help="human-annotated images")
    option("--n-test", type=int, help="held-out test images")
    option("--image-size", type=int, help="pixels")
    parser.add_argument(
        "--noise",
        default=None,
        metavar="TYPE=RATE,...",
        help="web caption noise rates, e.g. clean=0.5,partial=0.1,wrong_attribute=0.15,other_image=0.15,"
        "boilerplate=0.07,empty=0.03 (must sum to 1)",
    )


def _add_manifest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=location, default=DEFAULT_ROOT, help="manifest root (default: %(default)s)")
    parser.add_argument("--dataset", default="web", help="dataset name under the root (default: %(default)s)")


def add_download_options(parser: argparse.ArgumentParser) -> None:
    """The download's settings, for `download` and the flows (`download_options` reads them back)."""
    parser.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="let URLs resolving into this private network through (repeatable)",
    )
    option = functools.partial(config_option, parser, config=DOWNLOAD_CONFIG)
    option("--threads", type=int, help="download threads per process")
    option("--processes", type=int, help="img2dataset processes")
    option("--samples-per-shard", type=int, help="URLs per shard (a shard is the unit of resume)")
    option("--image-size", type=int, help="shortest side after resizing; smaller images are kept")
    option(
        "--opt-out-directives",
        type=lambda text: tuple(d for d in text.split(",") if d.strip()),
        metavar="D1,D2",
        help="X-Robots-Tag directives that opt an image out (recorded as download/opt_out); '' downloads them anyway",
    )
    option("--timeout", dest="timeout_s", type=int, help="seconds per connect and per socket read")


def download_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `DownloadConfig` fields the command line gave, by name (allowed networks as a list)."""
    from pipelines.stages.download import DownloadConfig

    given = config_kwargs(args, DownloadConfig)
    return given | ({"allowed_networks": list(args.allow_network)} if args.allow_network else {})


def world_config(args: argparse.Namespace):
    from pipelines.world.generate import WorldConfig

    options = config_kwargs(args, WorldConfig)
    if args.noise:
        options["noise_rates"] = _parse_rates(args.noise)
    return WorldConfig(**options)


def _parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--noise: {item!r} is not TYPE=RATE (e.g. clean=0.5)") from None
    return rates


def _world(args: argparse.Namespace) -> None:
    from pipelines.world.generate import make_world

    paths = make_world(args.out, world_config(args))
    print(
        f"world written to {paths.root}: web pairs {paths.web_pairs}, human set {paths.human_annotations}, "
        f"test set {paths.test_annotations}"
    )


def _serve_world(args: argparse.Namespace) -> None:
    from pipelines.world.server import WorldServer

    with WorldServer(args.world_dir, port=args.port) as server:
        url_list = server.write_url_list(args.url_list or args.world_dir / "web" / "urls.parquet")
        print(f"serving {args.world_dir} at {server.base_url}; URL list: {url_list}. Ctrl-C stops.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def _download(args: argparse.Namespace) -> None:
    from pipelines.stages.download import DownloadConfig, download, download_world

    generation = Generation(args.root, args.dataset, 0)
    config = DownloadConfig(**download_options(args))
    if args.world:
        download_world(config, args.world, generation)
    else:
        download(config, args.url_list, generation)
    print(format_generations(args.root))


def _explain(args: argparse.Namespace) -> None:
    from pipelines.report.explain import format_journey, sample_journey

    print(format_journey(sample_journey(args.root, args.dataset, args.sample)))


def _generations(args: argparse.Namespace) -> None:
    print(format_generations(args.root))
    if args.reasons:
        print(format_funnels(args.root))


def format_funnels(root: Location) -> str:
    """Per generation, the rows of each source left after each of its stages (reads the parts)."""
    from pipelines.report.report import funnel, rejected_rows

    blocks = []
    for generation in list_generations(root):
        info = generation.read_info()
        steps = funnel(info["counts"]["rows_by_source"], rejected_rows(generation), info.get("stages", []))
        header = ("source", *(step["step"] for step in next(iter(steps.values()), [])))
        rows = [header, *((source, *(str(step["rows"]) for step in left)) for source, left in steps.items())]
        title = f"{generation.dataset} gen {generation.number}: rows left after each stage"
        blocks.append("\n".join([title, *text_table(rows, indent="  ")]))
    return "\n\n".join(["", *blocks])


def format_generations(root: Location, rejects: bool = True) -> str:
    """A plain-text table of every generation under `root` (kept / rows, in all and per source), then (with
    `rejects`) its rejected rows by stage/reason."""
    generations = list_generations(root)
    if not generations:
        return f"no generations under {root}"
    sources = ("web", "synthetic", "human")
    lines = [("dataset", "gen", "parent", "kept/rows", *(f"{source} kept/rows" for source in sources), "created")]
    reasons = []
    for generation in generations:
        info = generation.read_info()
        counts = info["counts"]
        rows, kept = counts["rows_by_source"], counts["kept_by_source"]
        lines.append(
            (
                generation.dataset,
                str(generation.number),
                _dash(info.get("parent_generation")),
                f"{counts['kept']}/{counts['rows']}",
                *(f"{kept.get(source, 0)}/{rows.get(source, 0)}" for source in sources),
                info["created_at"],
            )
        )
        for reason, n in counts["rejected_by_stage_reason"].items():
            reasons.append(f"  {generation.dataset} gen {generation.number}: {reason:<32} {n}")
    return "\n".join(text_table(lines) + (["", "rejected (stage/reason):", *reasons] if rejects and reasons else []))


def text_table(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    """The lines of a plain-text table: every column as wide as its widest cell, two spaces between."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
