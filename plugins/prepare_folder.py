"""`dis prepare-folder`: a folder of images and a folder of index masks -> a manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins.options import json_option
from discli.cli.output import err_console, print_json


def prepare_folder(
    images: Path = typer.Argument(..., metavar="IMAGES_DIR", help="Folder of images "
                                  "(searched recursively)."),
    masks: Path = typer.Argument(..., metavar="MASKS_DIR", help="Folder of masks: for "
                                 "IMAGES_DIR/a/b.jpg, MASKS_DIR/a/b.png (or b_mask.png, "
                                 "b_label.png, b_gt.png, .mat); class indices, 255 = void."),
    classes: str = typer.Option(..., "--classes", help="Comma list or a file, one name a "
                                "line, in mask-value order; background (value 0) first; or a "
                                "named list: voc (the 21 VOC classes), coco (background + "
                                "COCO's 80)."),
    out: str = typer.Option(..., "--out", "-o", help="Manifest to write, or - for stdout."),
    split: str = typer.Option("train", "--split", help="Split name written in every record."),
    allow_unlabelled: bool = typer.Option(False, "--allow-unlabelled", help="Keep images "
                                          "without a mask (no labelmap, no tags) instead of "
                                          "stopping."),
    decode: bool = opt.DecodeOpt,
    skip_bad: bool = opt.SkipBadOpt,
    json_out: bool = json_option("Print the report as JSON on stdout."),
    quiet: bool = opt.NoProgressOpt,
) -> None:
    """Your own data: write a manifest (tags from the masks) that dis pretrain, finetune and
    evaluate read. Every mask is checked: index PNG, image size, values in the class list."""
    from dis_plugins._render import bad_table, reporter
    from discli.data.folder import FolderChecks, prepare_folder as run
    from discli.data.manifest import parse_classes
    from discli.errors import UsageError

    if out == "-" and json_out:
        raise UsageError("--json prints the report on stdout: give --out a file, not -")
    names = parse_classes(classes)
    with reporter(quiet) as rep:
        report = run(images, masks, names, out, split=split,
                     checks=FolderChecks(allow_unlabelled=allow_unlabelled, decode=decode,
                                         skip_bad=skip_bad), reporter=rep)
    if json_out:
        print_json(report)
        return
    from discli.cli.output import table as titled

    table = titled("class", "images", title=f"prepare-folder: {report['records']} images "
                  f"({report['with_labelmap']} with a mask) -> {report['out']}")
    for name, count in report["tag_counts"].items():
        table.add_row(name, str(count))
    err_console.print(table)
    if report["orphan_masks"]:
        shown = ", ".join(report["orphan_masks"][:10])
        err_console.print(f"{len(report['orphan_masks'])} mask(s) without an image: {shown}",
                          markup=False, highlight=False, soft_wrap=True)
    bad_table(report["bad"])
