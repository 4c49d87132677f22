"""The stage functions as Prefect tasks. Each announces on the terminal when it starts (with the data it
reads) and when it ends (with what it made and how long it took); see `pipelines.cli.console`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from flows.cli import METRIC_KEYS
from pipelines.cli.main import input_error
from pipelines.manifests.manifest import Generation
from pipelines.progress import announce
from pipelines.training.stages import TrainResult
from vlp_core.storage import Location

log = logging.getLogger(__name__)


def stage_task(function: Any, **options: Any) -> Any:
    """A Prefect task named `options["name"]` around a stage function, announcing its start and end;
    results are not cached by Prefect (stages resume on their own)."""
    name = options["name"]

    @functools.wraps(function)
    def announced(*args: Any, **kwargs: Any) -> Any:
        reads = describe_inputs([*args, *kwargs.values()])
        announce(log, "▸ %s%s", name, f"  {reads}" if reads else "")
        started = time.monotonic()
        try:
            result = function(*args, **kwargs)
        except Exception as error:
            announce(log, "✗ %s  %s  (%s)", name, error, format_duration(time.monotonic() - started))
            raise
        announce(log, "✓ %s  %s  (%s)", name, describe_result(result), format_duration(time.monotonic() - started))
        return result

    return task(announced, cache_policy=NONE, **options)


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for a task with retries: retry after a failure of the network or a server,
    not after bad input or settings (it would fail the same way again)."""
    return not isinstance(state.data, BaseException) or input_error(state.data) is None


def describe_inputs(values: Iterable[Any]) -> str:
    """The data a stage reads, in words: its generations and input files (settings and folders left out)."""
    words = []
    for value in values:
        if isinstance(value, Generation):
            words.append(generation_name(value))
        elif isinstance(value, Location) and value.is_file():
            words.append(value.name)
    return ", ".join(words)


def describe_result(result: Any) -> str:
    """What a stage made, in words: a generation's counts, a model, held-out metrics, a file."""
    if isinstance(result, TrainResult):
        last = result.losses[-1] if result.losses else {}
        return f"{result.steps} steps, loss {last.get('loss', float('nan')):.3f} → {result.checkpoint_dir}"
    if isinstance(result, Generation):
        return generation_name(result)
    if isinstance(result, Mapping) and {"rows", "kept"} <= result.keys():
        return f"{result['rows']:,} rows, {result['kept']:,} kept"
    if isinstance(result, Mapping) and "retrieval" in result:
        values = [(key, (result.get(group) or {}).get(key)) for group, key in METRIC_KEYS]
        return ", ".join(f"{key} {value:.3f}" for key, value in values if isinstance(value, int | float))
    return str(result) if result is not None else "done"


def generation_name(generation: Generation) -> str:
    return f"{generation.dataset} gen {generation.number}"


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    minutes, secs = divmod(round(seconds), 60)
    if minutes == 0:
        return f"{secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{minutes} min {secs:02d} s" if hours == 0 else f"{hours} h {minutes:02d} min"
