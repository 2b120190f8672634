"""Terminal output for the CLI: logs and progress on stderr (rich), data on stdout."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from discli.errors import shorten

# Wide enough that a table or a line is never cut or wrapped when the output is a file or a
# pipe (rich would assume 80 columns there); a terminal keeps its own width.
PIPE_WIDTH = 1000


class _Console(Console):
    """rich's Console, except that a reader going away (`dis ... | head`) raises
    BrokenPipeError for the CLI to end with 141 as for any other output, where rich's own
    handler exits 1 without a word."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    """A rich Console on stdout (data) or stderr (logs), as wide as needed when not a tty."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        tty = False
    return _Console(stderr=stderr, width=None if tty else PIPE_WIDTH)


err_console = console(stderr=True)


def warn(message: str) -> None:
    # One plain line: no rich markup interpretation, no wrapping, easy to grep.
    sys.stderr.write(f"dis: warning: {message}\n")


def note(message: str) -> None:
    """One plain line on stderr saying what a command chose for the user (a default it took
    from a run, a step it resumed), apart from the data on stdout."""
    sys.stderr.write(f"dis: {message}\n")


def error(message: str) -> None:
    # Exactly one line, whatever the message quotes: control characters (a newline in a file
    # name) are escaped and the length is capped (DisError caps its parts already; this also
    # covers click's messages, which quote option values whole).
    one_line = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
    sys.stderr.write(f"dis: error: {shorten(one_line, 4000)}\n")


def finite_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None: ``json.dumps`` would write
    them as ``NaN``/``Infinity``, which no strict JSON reader accepts."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """One line of strict JSON (non-finite numbers as null) on stdout."""
    sys.stdout.write(json.dumps(finite_json(data), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def table(*headers: Any, title: str | None = None, **options: Any) -> Any:
    """A rich ``Table`` whose title is never wrapped: rich fits a title into the table's own
    width, so a path over narrow columns broke mid-word (``manifests/one.json`` over ``l``);
    the table is made at least as wide as its title, which is plain text (a path's
    [brackets] are not markup). Left-justified unless ``title_justify`` says otherwise."""
    from rich.table import Table
    from rich.text import Text

    if title is not None:
        options.setdefault("title_justify", "left")
        options["min_width"] = max(options.get("min_width") or 0, len(title))
    return Table(*headers, title=Text(title) if title is not None else None, **options)


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

