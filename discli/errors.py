"""Errors the library raises for bad input, with the exit code the CLI maps each one to.

Every error carries a message that already names the file (or option) and the problem, so the
CLI prints it as one line. Exit codes are part of the public interface (see README).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error (a bug): traceback with --debug
EXIT_USAGE = 2  # bad option or argument (typer/click uses 2 as well)
EXIT_BAD_INPUT = 3  # a data file (image, labelmap, manifest, caption, config) is unusable
EXIT_INCOMPATIBLE = 4  # checkpoint or cache of another format, architecture or producer
EXIT_BUSY = 5  # another process holds the lock on the output
EXIT_INTERRUPTED = 130


class DisError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(DisError):
    exit_code = EXIT_USAGE


class BadInputError(DisError):
    exit_code = EXIT_BAD_INPUT


class IncompatibleError(DisError):
    exit_code = EXIT_INCOMPATIBLE


class BusyError(DisError):
    exit_code = EXIT_BUSY
