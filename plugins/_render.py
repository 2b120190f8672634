"""Rendering shared by the data and training commands (stderr only; data and JSON go to
stdout)."""

from __future__ import annotations

import sys

from discli.cli.output import RichReporter, err_console, print_json


def reporter(quiet: bool) -> RichReporter:
    # A progress bar only on a terminal: in a pipe or a log it would add lines around the
    # one-line error message that scripts grep for.
    return RichReporter(quiet=quiet or not err_console.is_terminal)


def bad_table(bad: list[dict[str, str]]) -> None:
    if not bad:
        return
    from discli.cli.output import table as titled

    table = titled("file", "problem", title=f"{len(bad)} bad item(s) skipped",
                   title_style="bold yellow", title_justify="center")
    for item in bad:
        table.add_row(item["path"], item["problem"])
    err_console.print(table)


def _num(value: object, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _pct(value: object) -> str:
    return "" if value is None else f"{100 * float(value):.1f}"  # type: ignore[arg-type]


def train_summary(stage: str, summary: dict) -> None:
    """The summary of `dis pretrain` / `dis finetune` as a table on stderr: one row per step
    (pretrain) or round (finetune), from the run's log."""
    from rich.table import Table

    finetune = stage == "finetune"
    done = summary["rounds" if finetune else "steps"]
    table = Table()
    table.add_column("round" if finetune else "step", justify="right")
    table.add_column("status")
    if finetune:
        table.add_column("pseudo-label pixels kept %", justify="right")
        table.add_column("tags added / removed", justify="right")
    table.add_column("iterations", justify="right")
    table.add_column("last loss", justify="right")
    results = summary.get("results", {})
    validated = any("val_miou" in r for r in results.values())
    if validated:
        table.add_column("val mIoU %", justify="right")
    for key, status in done.items():
        result = results.get(key, {})
        row = [str(key), str(status)]
        if finetune:
            estep = result.get("estep", {})
            changed = ("" if "tags_added" not in estep
                       else f"{estep['tags_added']} / {estep['tags_removed']}")
            row += [_pct(estep.get("kept_share")), changed]
        iterations = "" if status == "estep done" else str(result.get("iterations", ""))
        row += [iterations, _num(result.get("loss"), ".4g")]
        if validated:
            row.append(_pct(result.get("val_miou")))
        table.add_row(*row)
    err_console.print(f"{stage}: {summary['out']}", markup=False, highlight=False)
    err_console.print(table)
    checkpoint = summary.get("checkpoint", "(none yet: steps are left)")
    err_console.print(f"checkpoint: {checkpoint}", markup=False, highlight=False)


def training_output(stage: str, summary: dict, json_out: bool, quiet: bool) -> None:
    """What `dis pretrain` / `dis finetune` print on rank 0: the summary as JSON on stdout, or
    its table on stderr and the final checkpoint's path on stdout."""
    if json_out:
        print_json(summary)
        return
    if not quiet:
        train_summary(stage, summary)
    if "checkpoint" in summary:
        sys.stdout.write(summary["checkpoint"] + "\n")
