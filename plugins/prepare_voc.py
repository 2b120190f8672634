"""`dis prepare-voc`: a VOCdevkit tree (and optionally SBD) -> one manifest per split."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins.options import json_option
from discli.cli.output import err_console, print_json


def prepare_voc(
    voc: Path = typer.Argument(..., help="VOCdevkit/VOC2012, VOCdevkit, or the folder holding "
                                         "VOCdevkit."),
    out: Path = typer.Option(..., "--out", "-o", parser=opt.output_folder,
                             help="Folder for the manifests (<split>.jsonl)."),
    sbd: Path | None = typer.Option(None, "--sbd", help="SBD 'VOC augment' (benchmark_RELEASE "
                                    "or its dataset/): adds sbd_train, sbd_val and train_aug."),
    splits: str | None = typer.Option(None, "--splits", help="Comma list of VOC splits "
                                      "(default: every ImageSets/Segmentation/*.txt)."),
    classes: str | None = typer.Option(None, "--classes", help="Comma list or a file, one name "
                                       "a line, background first (default: the 21 VOC "
                                       "classes)."),
    decode: bool = opt.DecodeOpt,
    skip_bad: bool = opt.SkipBadOpt,
    json_out: bool = json_option("Print the report as JSON on stdout."),
    quiet: bool = opt.NoProgressOpt,
) -> None:
    """Write VOC12 (and SBD, train_aug) manifests with tags derived from the labelmaps."""
    from dis_plugins._render import bad_table, reporter
    from discli.data.manifest import parse_classes
    from discli.data.prepare import prepare_voc as run
    from discli.data.voc import VOC_CLASSES

    names = parse_classes(classes) if classes else VOC_CLASSES
    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    with reporter(quiet) as rep:
        report = run(voc, out, sbd=sbd, splits=split_list, classes=names, skip_bad=skip_bad,
                     decode=decode, reporter=rep)
    from discli.cli.output import warn

    for path in report["skipped"]:
        warn(f"{path} not found: that split was skipped")
    if json_out:
        print_json(report)
        return
    from discli.cli.output import table as titled

    table = titled("manifest", "records", "with labelmap", "path", title="prepare-voc")
    for name, m in report["manifests"].items():
        table.add_row(name, str(m["records"]), str(m["with_labelmap"]), m["path"])
    err_console.print(table)
    bad_table(report["bad"])
