"""`dis plot`: PNG plots of a run's training log, a demo report or an evaluation report."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins.options import output_file


def plot(
    source: Path = typer.Argument(..., metavar="RUN_OR_REPORT", help="A run folder (or its "
                                  "pretrain/ or finetune/, or a log.jsonl), a dis demo "
                                  "report.json (or its folder), or dis evaluate --json output."),
    output: Path | None = typer.Option(None, "--output", "-o", parser=output_file,
                                       help="PNG to write (default: training.png in a run "
                                       "folder, <name>.png beside a file)."),
) -> None:
    """Draw training curves (losses, lr, validation mIoU, E-step statistics), a demo's mIoU
    against t_ts per t_tr with per-class IoU, or an evaluation's IoU and confusion matrices.
    Prints the written path."""
    from discli.evaluation.plots import plot as draw

    for path in draw(source, output):
        typer.echo(str(path))
