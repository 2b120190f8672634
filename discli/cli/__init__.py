"""The `dis` command line: a typer app whose subcommands all arrive through entry points."""

from discli.cli.app import build_app, main

__all__ = ["build_app", "main"]
