"""Progress of long work, for whoever shows it. A stage wraps its long loop in `progress(...)` and calls
the `advance` it yields; the command line's console listens (`listen_to_progress`) and draws bars. With
no listener (a library call, a test, a Prefect worker, a Ray worker process) it costs nothing.
`announce` marks a log line for the terminal as well."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class ProgressListener(Protocol):
    def started(self, description: str, total: int | None, unit: str, done: int) -> object:
        """A new piece of work; returns a handle for the calls below."""

    def advanced(self, handle: object, amount: int) -> None: ...

    def finished(self, handle: object) -> None: ...


_listener: ProgressListener | None = None


def listen_to_progress(listener: ProgressListener | None) -> None:
    """Make `listener` receive every `progress` of this process (None: nobody does)."""
    global _listener
    _listener = listener


def _ignore(amount: int = 1) -> None:
    pass


@contextmanager
def progress(description: str, total: int | None, unit: str, done: int = 0) -> Iterator[Callable[[int], None]]:
    """Yields `advance(amount=1)`, to call as `amount` more `unit`s of `total` (None: unknown) are done;
    `done` are done already (a resumed run)."""
    listener = _listener
    if listener is None:
        yield _ignore
        return
    handle = listener.started(description, total, unit, done)
    try:
        yield lambda amount=1: listener.advanced(handle, amount)
    finally:
        listener.finished(handle)


class ProgressSender:
    """A listener for a child process: puts every event on `events` (a multiprocessing queue) as a
    ("started" | "advanced" | "finished", key, arguments) tuple, for `ProgressReplay` in the parent."""

    def __init__(self, events: Any) -> None:
        self.events = events
        self._keys = itertools.count()

    def started(self, description: str, total: int | None, unit: str, done: int) -> int:
        key = next(self._keys)
        self.events.put(("started", key, (description, total, unit, done)))
        return key

    def advanced(self, handle: object, amount: int) -> None:
        self.events.put(("advanced", handle, (amount,)))

    def finished(self, handle: object) -> None:
        self.events.put(("finished", handle, ()))


class ProgressReplay:
    """Replays a child's `ProgressSender` events to this process's listener (none: they are dropped)."""

    def __init__(self) -> None:
        self.listener = _listener
        self.handles: dict[object, object] = {}

    def replay(self, event: tuple[str, object, tuple]) -> None:
        kind, key, arguments = event
        if self.listener is None:
            return
        if kind == "started":
            self.handles[key] = self.listener.started(*arguments)
        elif kind == "advanced":
            self.listener.advanced(self.handles[key], *arguments)
        else:
            self.listener.finished(self.handles.pop(key))


TERMINAL = "terminal"  # a LogRecord attribute: this INFO line is for the terminal too, not only the log


def announce(logger: logging.Logger | logging.LoggerAdapter, message: str, *args: object) -> None:
    """Log `message` at INFO and mark it for the terminal (a stage starting or ending, a run's result)."""
    logger.info(message, *args, extra={TERMINAL: True})
