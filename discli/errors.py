"""Errors the library raises for bad input, with the exit code the CLI maps each one to.

Every error carries a message that already names the file (or option) and the problem, so the
CLI prints it as one line. Exit codes are part of the public interface (see README).

An option is named in a message as ``{opt:NAME}`` or ``{opt:NAME=VALUE}``: the library's text
(``str(exc)``) reads ``NAME`` / ``NAME=VALUE`` (the keyword a Python caller passed), the
command line's (:meth:`DisError.cli_message`) ``--NAME`` / ``--NAME VALUE`` (``--t-ts``, the
flag a shell user typed); ``{opt:KEYWORD/FLAG}`` where the two names differ (``steps/step``).
The library never spells a flag, and the CLI never rewrites prose.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error (a bug): traceback with --debug
EXIT_USAGE = 2  # bad option or argument (typer/click uses 2 as well)
EXIT_BAD_INPUT = 3  # a data file (image, labelmap, manifest, caption, config) is unusable
EXIT_INCOMPATIBLE = 4  # checkpoint or cache of another format, architecture or producer
EXIT_BUSY = 5  # another process holds the lock on the output
EXIT_SYSTEM = 6  # the system refused a file operation (disk full, read-only, permission, ...)
EXIT_DIVERGED = 7  # training produced a non-finite loss (the last checkpoint is kept)
EXIT_INTERRUPTED = 130

# What an error message may quote of one value (an id, a path, a line): a 100,000-character id
# must not make a 100,000-character error line.
MAX_QUOTED = 300


def shorten(text: object, limit: int = MAX_QUOTED) -> str:
    """``text`` as a string of at most about ``limit`` characters: the middle is cut and says
    how much, so both ends (a path's folder and file name) stay readable."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 10, 1)
    return f"{text[:keep]}...[{len(text) - 2 * keep} characters cut]...{text[-keep:]}"


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, shortened: ids, keys and words from untrusted files."""
    return shorten(repr(value), limit)


_OPTION = re.compile(r"\{opt:(\w+)(?:/(\w+))?(?:=([^}]*))?\}")


def _as_keyword(match: re.Match[str]) -> str:
    name, _, value = match.groups()
    return name if value is None else f"{name}={value}"


def _as_flag(match: re.Match[str]) -> str:
    name, flag_name, value = match.groups()
    flag = "--" + (flag_name or name).replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {value}"


class DisError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        # Cap both parts: a message must stay one readable line whatever the input quoted.
        self.template = shorten(message, 4 * MAX_QUOTED)
        super().__init__(self._render(_as_keyword))

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # Raised in a worker process (`dis demo` trains runs side by side), it must cross back
        # with its option markers and path, not as the rendered text.
        return (self.__class__, (self.template, self.path))

    def _render(self, option: Callable[[re.Match[str]], str] | None) -> str:
        message = self.template if option is None else _OPTION.sub(option, self.template)
        where = None if self.path is None else shorten(self.path)
        return f"{where}: {message}" if where else message

    def marked(self) -> str:
        """The message with its option markers kept: for an error that quotes another."""
        return self._render(None)

    def cli_message(self) -> str:
        """The message as the command line shows it: options named by their flags."""
        return self._render(_as_flag)


class UsageError(DisError):
    exit_code = EXIT_USAGE


class BadInputError(DisError):
    exit_code = EXIT_BAD_INPUT


class IncompatibleError(DisError):
    exit_code = EXIT_INCOMPATIBLE


class BusyError(DisError):
    exit_code = EXIT_BUSY


class SystemRefusedError(DisError):
    """The machine, not the data, said no: disk full, read-only file system, no permission, a
    folder where a file was expected. Nothing is wrong with dis or the input; the message names
    the path and what to do."""

    exit_code = EXIT_SYSTEM


class TrainingDivergedError(DisError):
    """A loss became NaN or infinite: the run stops before that step changes any weight, and the
    last checkpoint (from before it) stays as it was. Not a bug of dis nor of the data as such:
    the learning rate, warm-up or gradient clipping need changing."""

    exit_code = EXIT_DIVERGED


# errno -> what to tell the user. Only these are the user's environment; any other OSError
# stays an internal error (exit 1), as it may well be a bug.
_ADVICE = {
    _errno.ENOSPC: "no space left on the device; free some space (or write elsewhere) and run "
                   "the command again: finished outputs are kept",
    _errno.EDQUOT: "disk quota exceeded; free some space (or write elsewhere) and run the "
                   "command again: finished outputs are kept",
    _errno.EFBIG: "file too large for this file system; write elsewhere",
    _errno.EROFS: "read-only file system; choose an output on a writable one",
    _errno.EACCES: "permission denied; check the permissions or choose another path",
    _errno.EPERM: "operation not permitted; check the permissions or choose another path",
    _errno.EISDIR: "is a folder, but a file is expected here",
    _errno.ENOTDIR: "a component of the path is a file, but a folder is expected there",
    _errno.ENAMETOOLONG: "file name too long for this file system",
    _errno.ELOOP: "too many levels of symbolic links",
    _errno.ENOENT: "no such file or folder (it may have been removed while dis ran)",
    _errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    _errno.ENFILE: "too many open files on the system",
    _errno.EIO: "input/output error from the device; check the disk",
}


def system_error(exc: OSError, path: object | None = None) -> SystemRefusedError | None:
    """The one-line error for an OSError of the user's environment (None for any other).

    ``path``: the file dis was working on, named instead of the error's own file name (a
    ``write`` failing with ENOSPC names none, a failed rename names the temporary file)."""
    advice = _ADVICE.get(exc.errno) if isinstance(exc.errno, int) else None
    if advice is None:
        return None
    where = path if path is not None else exc.filename
    if where is None:
        advice += " (the error named no file)"
    return SystemRefusedError(advice, where)
