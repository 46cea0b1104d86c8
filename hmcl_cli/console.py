"""Console output: rich on a terminal, plain timestamped lines in CI logs."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Optional

from rich.console import Console

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def interactive() -> bool:
    return sys.stdout.isatty() and console.is_terminal


def log(message: str) -> None:
    """A status line (stdout)."""
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")


_WHOLE = 16  # a cell of one word up to this long keeps its line on a narrow terminal


def show_table(table) -> None:
    """A rich table whose cells are never cut short. On a terminal a cell too wide for its column
    wraps (a number, or any one word up to 16 characters, keeps its line). In a log (no terminal,
    where rich would fit the table to 80 columns and end model names, task names, even numbers,
    with an ellipsis) the table is printed at its natural width."""
    for column in table.columns:
        column.overflow = "fold"
        words = [len(c) for c in column.cells if isinstance(c, str) and len(c) <= _WHOLE and not c.split()[1:]]
        column.min_width = max([column.min_width or 0, *words])  # a number or metric is never split over lines
    if console.is_terminal:
        console.print(table, crop=False)  # (past a terminal's width the terminal wraps, rather than rich cut)
        return
    width = console.measure(table, options=console.options.update_width(1 << 16)).maximum
    Console(file=console.file, width=max(width, console.width), highlight=False).print(table)


@contextlib.contextmanager
def output_on_stderr(active: bool = True):
    """While a command writes its data to standard output (``hmcl eval --json -``), its tables and
    log lines go to stderr, so that ``| jq`` reads the data alone."""
    if not active:
        yield
        return
    before = console._file  # None: whatever sys.stdout is at each print
    console.file = sys.stderr
    try:
        yield
    finally:
        console._file = before


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}")


def duration(seconds: float) -> str:
    """A time span as people read it: 45s, 12m05s, 3h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressBar:
    """A progress bar with ETA; on a non-terminal, a plain line every ~10%, and at least every
    ``LINE_SECONDS`` (a CI job that hears nothing for 10 minutes is killed as hung by some CI
    services; 10% of a long training can be an hour), and at the end."""

    LINE_SECONDS = 300.0

    def __init__(self, description: str, total: Optional[int] = None, unit: str = "it", enabled: bool = True):
        self.description, self.total, self.unit, self.enabled = description, total, unit, enabled
        self.n = 0
        self.start = time.perf_counter()
        self._next_report = 0.1
        self._last_line = self.start
        self._rich = None
        self.postfix = ""
        if enabled and interactive():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._rich = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"), console=console, transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, postfix="")

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self._rich is not None:
            self._rich.update(self._task, advance=n, postfix=self.postfix)
        elif self.enabled and self.total:
            frac = self.n / self.total
            now = time.perf_counter()
            if (frac >= self._next_report or now - self._last_line >= self.LINE_SECONDS) and self.n < self.total:
                elapsed = now - self.start
                eta = elapsed / frac * (1 - frac)
                log(f"{self.description}: {self.n}/{self.total} {self.unit} ({frac:.0%}, eta {duration(eta)}) {self.postfix}")
                self._last_line = now
                while self._next_report <= frac:
                    self._next_report += 0.1

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.enabled:
            elapsed = time.perf_counter() - self.start
            took = f"{elapsed:.1f}s" + (f" ({duration(elapsed)})" if elapsed >= 120 else "")
            log(f"{self.description}: {self.n} {self.unit} in {took} {self.postfix}")
            self.enabled = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
