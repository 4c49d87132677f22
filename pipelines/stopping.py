"""Stopping a command cleanly on SIGTERM, SIGINT or SIGHUP (a scheduler, `kill`, Ctrl-C, a closed terminal).

Python's default for SIGTERM and SIGHUP ends the process at once: no `atexit` hook runs, so Prefect's
temporary server and any training child process are left running, orphaned. And on an exception in the
main thread, Python joins the worker threads before its `atexit` hooks run, while a thread that waits on a
training child process (the captioner's and filter's fine-tunings, side by side) waits until the child's
training ends. So a stop signal terminates this process's child processes first, then unwinds the main
thread with `Stopped`: the threads end, the command's temporary Prefect server stops as its block unwinds
(`flows/prefect_server.py`), and an `atexit` hook stops Ray's local cluster. Finished work is kept and a
re-run resumes from it (checkpoints, finished shards).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(SystemExit):
    """A stop signal arrived; exits with the shell's status for it, 128 + the signal's number."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(128 + signal_number)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.code - 128).name


@contextlib.contextmanager
def stopping_cleanly_on_signals() -> Iterator[None]:
    """Within the block, `stop` handles every STOP_SIGNALS; the handlers before it come back after. Only in the
    main thread, where Python runs signal handlers (elsewhere the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _handlers_put_back(STOP_SIGNALS):
        for signal_number in STOP_SIGNALS:
            signal.signal(signal_number, stop)
        yield


@contextlib.contextmanager
def _handlers_put_back(signal_numbers: tuple[int, ...]) -> Iterator[None]:
    """The handlers of `signal_numbers` as they are now come back at the end of the block, whatever replaced
    them within it (in the main thread; no other thread can set one)."""
    before = {signal_number: signal.getsignal(signal_number) for signal_number in signal_numbers}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signal_number, handler in before.items():
                signal.signal(signal_number, handler)


def stop(signal_number: int, frame: FrameType | None) -> None:
    """The handler: terminate this process's child processes (started with multiprocessing), raise `Stopped`."""
    for child in multiprocessing.active_children():
        child.terminate()
    raise Stopped(signal_number)


def reclaim_sigterm() -> None:
    """Inside a Prefect flow run: put `stop` back on SIGTERM if this command stops cleanly (`stop` handles its
    SIGINT). Prefect's flow engine swaps in its own SIGTERM handler for the run, one that unwinds the flow and
    hands on to `stop` only after the flow's task runner has joined its threads: a thread waiting on a
    training child would hold the exit until the training ends. In a flow run by a Prefect worker, Prefect's
    handler stays (it reports cancellations)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is stop:
        signal.signal(signal.SIGTERM, stop)


@contextlib.contextmanager
def img2dataset_stops_cleanly() -> Iterator[None]:
    """Around img2dataset's `download`, which installs a SIGINT handler of its own that exits with status 0 and
    leaves it in place: a Ctrl-C during the download still ends as `Stopped` (130), and the SIGINT handler of
    before (`stop`) is back afterwards, or every later Ctrl-C of the command would end it with status 0."""
    with _handlers_put_back((signal.SIGINT,)):
        try:
            yield
        except Stopped:  # by another signal, through `stop`
            raise
        except SystemExit as exit:  # img2dataset exits only from its SIGINT handler
            raise Stopped(signal.SIGINT) from exit


def keep_sigterm_handler(start: Callable[[], None]) -> None:
    """Call `start`, a library's set-up that replaces the SIGTERM handler (`ray.init` installs one that only
    exits, and its core worker a C handler that ends the process at once), then put back the handler that was
    there before if one was set in Python (`stop`, or Prefect's while a flow runs, which hands on to `stop`)."""
    before = signal.getsignal(signal.SIGTERM)
    start()
    if callable(before) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)
