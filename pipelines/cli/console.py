"""The terminal of a long command (`capfilt run`, `capfilt ablate`), made for people: a line as each stage
starts and ends, progress bars with rate and ETA that update in place, and capfilt's own warnings. Everything
else that the process and its children print (Ray, Prefect, img2dataset, open_clip, transformers, and
capfilt's INFO log) goes to a log file in the run folder. `--verbose` keeps today's full log on the terminal
instead (and still writes the file)."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from pipelines.progress import TERMINAL, listen_to_progress
from vlp_core.storage import Location, cache_dir, is_remote, location

LOG_FILE = "capfilt.log"
OWN_LOGGERS = ("pipelines", "vlp_core", "flows", "benchmarks")  # their warnings are shown on the terminal
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RateColumn(ProgressColumn):
    """The average rate since the bar started (steadier than rich's recent-samples speed when work arrives
    in blocks) and the time left at that rate."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields["done_before"]
        if done <= 0 or not task.elapsed:
            return Text("")
        rate, unit = done / task.elapsed, task.fields["unit"]
        speed = f"{rate:.1f} {unit}/s" if rate >= 1 else f"{rate * 60:.1f} {unit}/min"
        if task.total is None:
            return Text(speed, no_wrap=True)
        left = round(max(task.total - task.completed, 0) / rate)
        return Text(f"{speed} ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", no_wrap=True)


class TerminalConsole:
    """Stage lines and warnings printed above the progress bars (a `ProgressListener` of `pipelines.progress`)."""

    def __init__(self, terminal: TextIO) -> None:
        self.rich = Console(file=terminal, highlight=False, soft_wrap=True)
        self.bars = Progress(
            TextColumn("  {task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            RateColumn(),
            console=self.rich,
            redirect_stdout=False,  # what Python prints belongs in the log file, not above the bars
            redirect_stderr=False,
            transient=True,  # a finished bar leaves the screen; the stage's end line says what it did
        )

    def print(self, line: str) -> None:
        self.rich.print(line, markup=False, highlight=False)

    def started(self, description: str, total: int | None, unit: str, done: int) -> TaskID | None:
        if not self.rich.is_terminal:  # bars update in place; a file or a pipe gets the stage lines only
            return None
        self.bars.start()
        return self.bars.add_task(description, total=total, completed=done, unit=unit, done_before=done)

    def advanced(self, handle: TaskID | None, amount: int) -> None:
        if handle is not None:
            self.bars.advance(handle, amount)

    def finished(self, handle: TaskID | None) -> None:
        if handle is None:
            return
        self.bars.refresh()  # its last state is drawn once, however fast the work went
        self.bars.remove_task(handle)
        if not self.bars.tasks:
            self.bars.stop()


class TerminalHandler(logging.Handler):
    """Shows a record on the terminal when it is marked for it (`pipelines.progress.announce`), or when it
    is a warning or error of capfilt's own loggers."""

    def __init__(self, console: TerminalConsole) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_LOGGERS
        return getattr(record, TERMINAL, False) or (own and record.levelno >= logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.console.print(f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message)


@contextmanager
def command_console(run_dir: Location, verbose: bool = False) -> Iterator[Path]:
    """For the duration of a command: the terminal shows stage lines, bars and warnings, and the file
    `run_dir/capfilt.log` (yielded) receives everything else the process and its child processes write.
    With `verbose`, everything stays on the terminal as well. For a remote `run_dir` the log is a local file
    (in capfilt's cache; file descriptors need one), copied to `run_dir/capfilt.log` when the command ends."""
    run_dir = location(run_dir)
    if not is_remote(run_dir):
        with _console(run_dir / LOG_FILE, verbose) as log_path:
            yield log_path
        return
    log_path = cache_dir() / "logs" / f"{run_dir.name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]}.log"
    try:
        with _console(log_path, verbose):
            yield log_path
    finally:
        if log_path.is_file():
            (run_dir / LOG_FILE).write_bytes(log_path.read_bytes())


@contextmanager
def _console(log_path: Path, verbose: bool) -> Iterator[Path]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if verbose:
        to_file = logging.FileHandler(log_path, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(to_file)
        try:
            yield log_path
        finally:
            root.removeHandler(to_file)
            to_file.close()
        return

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log_path, "ab") as log_file:  # C++ (Ray's core worker), child processes and Python alike
        for fd in saved:
            os.dup2(log_file.fileno(), fd)
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    console = TerminalConsole(terminal)
    handler = TerminalHandler(console)
    root.addHandler(handler)
    listen_to_progress(console)
    try:
        yield log_path
    finally:
        listen_to_progress(None)
        if console.bars.live.is_started:  # a command that failed with bars on the screen
            console.bars.stop()
        root.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        terminal.close()
        logging.getLogger("prefect").setLevel(logging.WARNING)  # not its INFO as the process exits either
