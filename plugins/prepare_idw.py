"""`dis prepare-idw`: images with captions -> a manifest tagged from the captions."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins.options import json_option
from discli.cli.output import err_console, print_json


def prepare_idw(
    source: Path = typer.Argument(..., help="Captions: a .jsonl file, a COCO captions .json, a "
                                            "folder of images with <name>.txt, or a manifest."),
    out: str = typer.Option(..., "--out", "-o", help="Manifest to write, or - for stdout."),
    root: Path | None = typer.Option(None, "--root", help="Folder the image paths are relative "
                                     "to (default: the caption file's folder)."),
    classes: str | None = typer.Option(None, "--classes", help="Comma list or a file, one name "
                                       "a line, background first (default: the 21 VOC "
                                       "classes)."),
    split: str = typer.Option("train", "--split", help="Split name written in every record."),
    fmt: str = typer.Option("auto", "--format", help="jsonl, coco, folder, manifest or auto."),
    lexicon: Path | None = typer.Option(None, "--lexicon", help="A lexicon JSON replacing the "
                                        "shipped one (class -> words)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave bad images and lines out "
                                  "and list them, instead of stopping at the first."),
    json_out: bool = json_option("Print the report as JSON on stdout."),
    quiet: bool = opt.NoProgressOpt,
) -> None:
    """Validate every image, parse captions into tags and write a manifest (tag_source caption).

    Reports the number of images tagged with each class and the images with no tag.
    """
    from dis_plugins._render import bad_table, reporter
    from discli.data.idw import CaptionReading, prepare_idw as run
    from discli.data.manifest import parse_classes
    from discli.data.voc import VOC_CLASSES
    from discli.errors import UsageError

    if out == "-" and json_out:
        raise UsageError("--json prints the report on stdout: give --out a file, not -")
    names = parse_classes(classes) if classes else VOC_CLASSES
    with reporter(quiet) as rep:
        report = run(source, out, classes=names, split=split,
                     reading=CaptionReading(fmt=fmt, root=root, lexicon=lexicon),
                     skip_bad=skip_bad, reporter=rep)
    if json_out:
        print_json(report)
        return
    from discli.cli.output import table as titled

    table = titled("class", "images tagged", title=f"prepare-idw: {report['records']} images "
                  f"({report['format']}) -> {report['out']}")
    for name, count in report["tag_counts"].items():
        table.add_row(name, str(count))
    table.add_row("(no tag)", str(len(report["untagged"])), style="dim")
    err_console.print(table)
    if report["untagged"]:
        shown = ", ".join(report["untagged"][:10])
        more = f" and {len(report['untagged']) - 10} more" if len(report["untagged"]) > 10 else ""
        err_console.print(f"no tag: {shown}{more}", markup=False, highlight=False,
                          soft_wrap=True)
    bad_table(report["bad"])
