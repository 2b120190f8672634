"""Builds the `dis` app from the ``dis.commands`` entry points and maps errors to exit codes.

An entry point may name a ``typer.Typer`` (added as a command group, e.g. ``dis clean-tags``) or a
plain function (added as one command). A plugin that fails to import prints one warning line on
stderr and every other command still works.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import signal
import sys
import traceback
import warnings
from typing import Any

import typer

try:  # typer >= 0.22 runs on its own vendored copy of click: its exceptions are those
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on the click package
    import click  # type: ignore[no-redef]

from discli import __version__
from discli.cli.output import error, warn
from discli.entrypoints import COMMANDS_GROUP, Plugin, load_group
from discli.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, DisError, DisWarning, Interrupted,
                           UsageError, out_of_memory, peer_failure, system_error)

# click >= 8.2 raises this for a group called without a command (it prints the help)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
# `dis ... | head`: the reader went away (128 + SIGPIPE, as the shell reports a SIGPIPE death).
EXIT_BROKEN_PIPE = 141

# What the last build_app() loaded, for `dis plugins`.
LOADED: list[Plugin] = []


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dis {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
) -> None:
    """dis: semi-supervised semantic segmentation by deep dual learning (DIS, ICCV 2017)."""


def build_app() -> typer.Typer:
    app = typer.Typer(name="dis", no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False, context_settings={
                          "help_option_names": ["-h", "--help"]})
    app.callback()(_root)
    LOADED.clear()
    for plugin in load_group(COMMANDS_GROUP):
        LOADED.append(plugin)
        if not plugin.ok:
            if not plugin.error.startswith("not loaded"):
                warn(f"plugin {plugin.name!r} ({plugin.distribution}) failed to load: "
                     f"{plugin.error}")
            continue
        if isinstance(plugin.obj, typer.Typer):
            app.add_typer(plugin.obj, name=plugin.name)
        elif callable(plugin.obj):
            app.command(name=plugin.name)(plugin.obj)
        else:
            plugin.error = f"not a typer.Typer or a function: {type(plugin.obj).__name__}"
            warn(f"plugin {plugin.name!r} ({plugin.distribution}) failed to load: {plugin.error}")
    return app


def refuse_non_finite(command: Any) -> Any:
    """Wrap every command's callback (recursively) so that a float option given as nan or inf
    is refused with exit 2: click's float type accepts them, and they pass every range check
    (``min=0, max=1`` included) the wrong way, so a NaN step size would "succeed" with an
    all-background labelmap. One place covers every command, plugins' included."""
    for sub in getattr(command, "commands", {}).values():
        refuse_non_finite(sub)
    callback = getattr(command, "callback", None)
    if callback is None or getattr(callback, "_dis_finite", False):
        return command
    flags = {p.name: max(getattr(p, "opts", None) or [p.name], key=len) for p in command.params}

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, value in kwargs.items():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise UsageError(f"{flags.get(name, name)}: {item} is not a finite number")
        return callback(*args, **kwargs)

    checked._dis_finite = True  # type: ignore[attr-defined]
    command.callback = checked
    return command


def unwrap_help(command: Any) -> Any:
    """Join the hard line breaks inside each paragraph of every command's help (recursively).
    Docstrings are wrapped at 100 columns in the source; typer keeps their line breaks, which
    in a narrower terminal gives ragged text. Paragraphs stay; one marked with click's ``\\b``
    keeps its lines."""
    for sub in getattr(command, "commands", {}).values():
        unwrap_help(sub)
    if command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n"))
                                    for p in paragraphs)
    return command


class _Stopped(Exception):
    """Carries an interruption past typer, which turns any KeyboardInterrupt into a bare exit
    130 and so would drop what it says (the signal, the checkpoint kept)."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def carry_interrupts(command: Any) -> Any:
    """Wrap every command's callback (recursively) so that its interruption reaches
    :func:`main` whole (:class:`_Stopped`)."""
    for sub in getattr(command, "commands", {}).values():
        carry_interrupts(sub)
    callback = getattr(command, "callback", None)
    if callback is None or getattr(callback, "_dis_carries", False):
        return command

    @functools.wraps(callback)
    def carried(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _Stopped(exc) from None

    carried._dis_carries = True  # type: ignore[attr-defined]
    command.callback = carried
    return command


def _usage_line(exc: click.ClickException) -> str:
    """A click usage error as one line: the problem, then where to find help."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"{message} (see '{ctx.command_path} --help')"
    return message


def _broken_pipe() -> int:
    """The reader of our stdout went away (`dis ... | head`): stop quietly with 141 (128 +
    SIGPIPE, what the shell reports for a tool killed by SIGPIPE), so `set -o pipefail` scripts
    still see that the output was cut short."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def _terminated(signum: int, frame: Any) -> None:
    # SIGTERM (a batch scheduler's notice before its kill) ends dis as Ctrl-C does: every
    # `finally` runs (locks, temporary files), and training saves a checkpoint first.
    raise Interrupted(signum)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None, *, _default: Any = None) -> None:
    if issubclass(category, DisWarning):
        warn(str(message))
    elif _default is not None:
        _default(message, category, filename, lineno, file, line)


def _interrupted(exc: KeyboardInterrupt) -> int:
    if isinstance(exc, Interrupted):
        what = "terminated" if exc.exit_code != EXIT_INTERRUPTED else "interrupted"
        error(f"{what} ({exc.name})" + (f": {exc.message}" if exc.message else ""))
        return exc.exit_code
    error("interrupted")
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure is one line on stderr and a documented exit code (README)."""
    previous_term = None
    try:
        previous_term = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (a caller's thread): leave signals alone
        pass
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, _default=shown)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DisWarning)
            return _main(argv)
    finally:
        warnings.showwarning = shown
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _open_absent_streams() -> None:
    """Started with a standard stream closed (`dis ... <&-`, `2>&-`): Python leaves it None, or
    (stderr) a stream on the closed descriptor whose every write fails. Read an absent stdin as
    empty input (so `-` arguments say what is missing) and discard writes to an absent
    stdout/stderr, instead of failing on None or turning every exit code into 1. The null
    device takes the free descriptor, so no file dis opens later lands on it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        stream = getattr(sys, name)
        if stream is None or (stream is getattr(sys, f"__{name}__") and not _usable(fd, mode)):
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))


def _usable(fd: int, mode: str) -> bool:
    """Whether descriptor ``fd`` is open for ``mode``: a closed one may have been reused, read-only,
    by whatever opened a file first (the interpreter reading the console script)."""
    try:
        import fcntl  # POSIX: elsewhere every stream Python opened is taken as usable
    except ImportError:
        return True
    try:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return False
    return access in ((os.O_RDONLY, os.O_RDWR) if mode == "r" else (os.O_WRONLY, os.O_RDWR))


def _exited(exc: SystemExit) -> int:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if code == 1 and isinstance(sys.stdout, click.utils.PacifyFlushWrapper):
        return _broken_pipe()  # typer/click turned EPIPE into exit 1
    return code


def _os_failure(exc: OSError, debug: bool) -> int:
    """Disk full, read-only, permission...: the user's machine, not a bug."""
    if debug:
        traceback.print_exc()
    refused = system_error(exc)
    if refused is None:
        error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for a "
              f"traceback)")
        return EXIT_FAILURE
    error(refused.cli_message())
    return refused.exit_code


def _bug(exc: Exception, debug: bool) -> int:
    """A bug: one line unless --debug (or the failure of another rank of a distributed run)."""
    if debug:
        traceback.print_exc()
    lost = peer_failure(exc, os.environ.get("RANK", 0), os.environ.get("WORLD_SIZE", 1))
    if lost is None:
        lost = out_of_memory(exc)
    if lost is not None:
        error(lost.cli_message())
        return lost.exit_code
    error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)")
    return EXIT_FAILURE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("DIS_DEBUG"))
    _open_absent_streams()
    try:
        command = typer.main.get_command(build_app())
        command = carry_interrupts(refuse_non_finite(unwrap_help(command)))
        code = command(args=argv, prog_name="dis", standalone_mode=False)
    except SystemExit as exc:
        return _exited(exc)
    except _NO_ARGS_IS_HELP as exc:  # `dis` alone: the help
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:  # bad option or argument
        if debug:
            traceback.print_exc()
        error(_usage_line(exc))
        return exc.exit_code
    except typer.Abort:  # EOF on an interactive prompt
        error("aborted")
        return EXIT_FAILURE
    except DisError as exc:
        if debug:
            traceback.print_exc()
        error(exc.cli_message())
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except _Stopped as exc:
        return _interrupted(exc.interrupt)
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as exc:
        return _os_failure(exc, debug)
    except Exception as exc:
        return _bug(exc, debug)
    if code == EXIT_INTERRUPTED:  # typer turns ^C into a silent exit 130
        error("interrupted")
    # In non-standalone mode click returns the command's return value, or the code of an Exit.
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def run() -> None:
    """Console-script entry."""
    sys.exit(main())
