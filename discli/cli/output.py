"""Terminal output for the CLI: logs and progress on stderr (rich), data on stdout."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

err_console = Console(stderr=True)


def warn(message: str) -> None:
    # One plain line: no rich markup interpretation, no wrapping, easy to grep.
    sys.stderr.write(f"dis: warning: {message}\n")


def error(message: str) -> None:
    sys.stderr.write(f"dis: error: {message}\n")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


class RichReporter:
    """A :class:`discli.progress.Reporter` drawing a rich progress bar on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._last = 0.0

    def start(self, task: str, total: int | None = None) -> None:
        self.close()
        if self.quiet:
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=err_console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(task, total=total, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._progress.update(self._task, advance=n, metrics=text)

    def log(self, message: str) -> None:
        if not self.quiet:
            err_console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def elapsed(since: float) -> str:
    return f"{time.perf_counter() - since:.1f}s"
