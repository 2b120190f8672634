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
import signal as _signal
import warnings
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error (a bug): traceback with --debug
EXIT_USAGE = 2  # bad option or argument (typer/click uses 2 as well)
EXIT_BAD_INPUT = 3  # a data file (image, labelmap, manifest, caption, config) is unusable
EXIT_INCOMPATIBLE = 4  # checkpoint or cache of another format, architecture or producer
EXIT_BUSY = 5  # another process holds the lock on the output
EXIT_SYSTEM = 6  # the system refused a file operation (disk full, read-only, permission, ...)
EXIT_DIVERGED = 7  # training produced a non-finite loss (the last checkpoint is kept)
EXIT_PEER = 8  # a process of the same torchrun job died, or the process group broke
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

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


def first_line(exc: BaseException, limit: int = 200) -> str:
    """What an exception says, for a message of ours: its first line, cut at a word boundary
    when longer than ``limit`` (marked "..."), or its type's name when it says nothing."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."
    return text


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
        if path is None and "Original Traceback" in message:
            # Raised in a DataLoader worker, torch re-raises it as type(exc)(its whole report):
            # the report's last line is "<module>.<Class>: <our message>", one line again.
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
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


class CorruptError(IncompatibleError):
    """A checkpoint or cache whose bytes changed after dis wrote them (its content no longer
    matches the digest written with it) or that does not read back (truncated). Same exit code
    as any other unusable checkpoint or cache; its own class so that a run can rebuild such a
    file from a good copy instead of stopping."""


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


class PluginError(DisError):
    """A third-party plugin (an entry point of another package) failed at its own work: a bug
    of that package, not of dis or the data. The message names the plugin and its package."""


class PeerFailureError(DisError):
    """Another process of the same torchrun job died (killed, out of memory, its machine lost)
    or the process group broke: not a bug of dis nor of the data. Every rank checkpoints the
    same way, so rerunning the same command resumes."""

    exit_code = EXIT_PEER


# What gloo, NCCL and the c10d store say when the other end of a collective went away. Matched
# on the text: these arrive as plain RuntimeErrors as often as DistBackendError.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "processgroup",
              "process group", "nccl", "gloo", "c10d")
_DIST_ERRORS = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}


def peer_failure(exc: BaseException, rank: object = None,
                 world_size: object = None) -> PeerFailureError | None:
    """The one-line error for a collective that failed because a peer process died (None for
    any other exception). Only raised inside a torchrun job (``world_size`` > 1): a lone process
    has no peer, and the same words there would be a bug."""
    try:
        world = int(str(world_size))
    except ValueError:
        return None
    if world <= 1:
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).lower()
    if not (names & _DIST_ERRORS or (isinstance(exc, RuntimeError)
                                     and any(words in text for words in _PEER_GONE))):
        return None
    lines = str(exc).strip().splitlines()
    detail = shorten(lines[-1] if lines else type(exc).__name__, 160)
    return PeerFailureError(f"rank {rank} of {world}: a peer process of this torchrun job died "
                            f"or the process group broke ({type(exc).__name__}: {detail}); "
                            f"rerun the same command to resume from the last checkpoint")


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (what batch schedulers send before a kill), raised as a
    KeyboardInterrupt so that every ``finally`` (locks, temporary files) runs alike for both.
    ``message`` says what was kept; :attr:`exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int | None = None, message: str = ""):
        self.signum = signum
        self.message = message
        super().__init__(message)

    @property
    def name(self) -> str:
        if self.signum is None:
            return "a signal to another rank"
        try:
            return _signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.signum == _signal.SIGTERM else EXIT_INTERRUPTED

    def __reduce__(self) -> tuple[type, tuple[int | None, str]]:
        return (self.__class__, (self.signum, self.message))


class DisWarning(UserWarning):
    """Something the user must know that does not stop the command (a corrupt part file
    removed and redone, images with EXIF rotation). The CLI prints each as one line,
    ``dis: warning: ...``; a Python caller gets an ordinary warning to filter or raise."""


def warn(message: str, path: object | None = None) -> None:
    """Issue a :class:`DisWarning` whose text names ``path`` first, like an error's."""
    where = None if path is None else shorten(path)
    text = shorten(message, 4 * MAX_QUOTED)
    warnings.warn(DisWarning(f"{where}: {text}" if where else text), stacklevel=2)


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


# What torch's allocators say when a tensor does not fit (CPU: "DefaultCPUAllocator: can't
# allocate memory: you tried to allocate N bytes"; CUDA: torch.OutOfMemoryError).
_NO_MEMORY = ("can't allocate memory", "out of memory", "unable to allocate")
_TRIED = re.compile(r"(?:allocate|Allocation of) (\d+) bytes|allocate ([\d.]+ [KMGT]i?B)")


def out_of_memory(exc: BaseException) -> SystemRefusedError | None:
    """The one-line error for an allocation that the machine could not satisfy (None for any
    other exception): the input's sizes, not dis, decide how much memory a step needs."""
    if not (isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
            words in str(exc).lower() for words in _NO_MEMORY))):
        return None
    match = _TRIED.search(str(exc))
    tried = ""
    if match and match.group(1):
        tried = f" (a tensor of {int(match.group(1)) / 2**30:.1f} GiB)"
    elif match:
        tried = f" (a tensor of {match.group(2).replace('. ', ' ')})"
    return SystemRefusedError(f"not enough memory{tried}; use smaller images, crops or "
                              f"batches (--max-size, --crop-size, --batch-size), or a machine "
                              f"with more memory")
