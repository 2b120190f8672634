"""Rendering shared by the data commands (stderr only; data and JSON go to stdout)."""

from __future__ import annotations

from discli.cli.output import RichReporter, err_console


def reporter(quiet: bool) -> RichReporter:
    # A progress bar only on a terminal: in a pipe or a log it would add lines around the
    # one-line error message that scripts grep for.
    return RichReporter(quiet=quiet or not err_console.is_terminal)


def bad_table(bad: list[dict[str, str]]) -> None:
    if not bad:
        return
    from rich.table import Table

    table = Table("file", "problem", title=f"{len(bad)} bad item(s) skipped",
                  title_style="bold yellow")
    for item in bad:
        table.add_row(item["path"], item["problem"])
    err_console.print(table)
