"""Builds the `dis` app from the ``dis.commands`` entry points and maps errors to exit codes.

An entry point may name a ``typer.Typer`` (added as a command group, e.g. ``dis clean-tags``) or a
plain function (added as one command). A plugin that fails to import prints one warning line on
stderr and every other command still works.
"""

from __future__ import annotations

import os
import sys
import traceback
import typer

from discli import __version__
from discli.cli.output import error, warn
from discli.entrypoints import COMMANDS_GROUP, Plugin, load_group
from discli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, DisError

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("DIS_DEBUG"))
    try:
        build_app()(args=argv, prog_name="dis", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except DisError as exc:
        if debug:
            traceback.print_exc()
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout went away (`dis ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        return EXIT_FAILURE
    return 0


def run() -> None:
    """Console-script entry."""
    sys.exit(main())
