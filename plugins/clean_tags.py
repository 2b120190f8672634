"""`dis clean-tags`: inspect the noisy and cleaned tags of finetune caches, or compute them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dis_plugins import options as opt
from discli.cli.output import RichReporter, print_json
from discli.infer.settings import MAX_STEPS

app = typer.Typer(help="Noisy vs cleaned image tags of a pseudo-label cache (export, show, "
                  "diff, stats) or of a tagged manifest (run).", no_args_is_help=True)

THRESHOLD = typer.Option(None, "--threshold", "-t", min=0.0, max=1.0,
                         help="A class is a cleaned tag when its probability is >= this "
                         "(default: the run's own tag cleaning rule, from the config.toml of "
                         "the run folder the cache is in; else 0.5).")
JSON = opt.json_option("JSON on stdout.")


def _console() -> Any:
    from discli.cli.output import console

    return console()


def _rule(cache: Path, threshold: float | None) -> Any:
    from discli.train.clean import run_rule

    return run_rule(cache, threshold)


def _is_folder(output: str) -> bool:
    """``-o`` names a folder (labelmap export) when it is one, ends with a slash or has no
    file suffix; ``tags.jsonl``, ``tags.csv`` name a file."""
    import os

    path = Path(output)
    return output != "-" and (path.is_dir() or output.endswith(("/", os.sep))
                              or path.suffix == "")


@app.command()
def export(
    cache: Path = typer.Argument(..., help="Pseudo-label cache (cache.h5)."),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl, csv or tsv."),
    threshold: float | None = THRESHOLD,
    output: str = typer.Option("-", "--output", "-o", help="Output file (- = stdout), or a "
                               "folder (existing, ending with /, or without a suffix): the "
                               "labelmaps as palette PNGs plus tags.jsonl."),
    confidence: float | None = typer.Option(None, "--confidence", min=0.0, max=1.0,
                                            help="Folder export: pixels below this "
                                            "confidence become 255 (void; default: the run's "
                                            "confidence from its config.toml, else 0)."),
    gate: str | None = typer.Option(None, "--gate", help="Folder export: none, noisy or "
                                    "cleaned: pixels of classes these tags say are absent "
                                    "become 255 (default: the run's tag_gate, else none)."),
    json_out: bool = JSON,
) -> None:
    """One line per image: id, noisy tags, cleaned tags, tag probabilities; or, with -o DIR,
    every pseudo-labelmap as a VOC palette PNG (ignored pixels 255) plus DIR/tags.jsonl."""
    from discli.pseudo import tags
    from discli.errors import UsageError

    if fmt not in tags.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(tags.FORMATS)}, not {fmt!r}")
    if _is_folder(output):
        from discli.train.clean import export_run_cache

        if fmt != "jsonl":
            raise UsageError("a folder export writes tags.jsonl: --format must be jsonl")
        result = export_run_cache(cache, output, threshold, confidence, gate)
        if json_out:
            print_json(result)
        else:
            typer.echo(result["out"])
        return
    if confidence is not None or gate is not None or json_out:
        raise UsageError("--confidence, --gate and --json go with a folder export (-o DIR)")
    tags.export_tags(cache, output, fmt, _rule(cache, threshold))


@app.command()
def show(
    cache: Path = typer.Argument(..., help="Pseudo-label cache."),
    image_id: str = typer.Argument(..., metavar="ID", help="Image id."),
    threshold: float | None = THRESHOLD,
    json_out: bool = JSON,
) -> None:
    """Per class: the noisy tag, the probability after inference, the cleaned tag."""
    from discli.cli.output import table as titled

    from discli.pseudo import tags

    info = tags.show(tags.open_cache(cache), image_id, _rule(cache, threshold))
    if json_out:
        print_json({k: v for k, v in info.items() if k != "table"})
        return
    table = titled("class", "noisy", "prob", "cleaned", "", title=image_id)
    for row in info["table"]:
        change = ("added" if row["cleaned"] and not row["noisy"]
                  else "removed" if row["noisy"] and not row["cleaned"] else "")
        if row["noisy"] or row["cleaned"] or row["prob"] >= 0.05:
            table.add_row(row["class"], "x" if row["noisy"] else "", f"{row['prob']:.3f}",
                          "x" if row["cleaned"] else "", change)
    _console().print(table)


@app.command("diff")
def diff_cmd(
    cache: Path = typer.Argument(..., help="Pseudo-label cache."),
    threshold: float | None = THRESHOLD,
    json_out: bool = JSON,
) -> None:
    """Tags added and removed by cleaning, per image, and counts per class."""
    from discli.cli.output import table as titled

    from discli.pseudo import tags

    result = tags.diff(tags.open_cache(cache), _rule(cache, threshold))
    if json_out:
        print_json(result)
        return
    for image in result["images"]:
        parts = [f"+{c}" for c in image["added"]] + [f"-{c}" for c in image["removed"]]
        typer.echo(f"{image['id']}\t{' '.join(parts)}")
    table = titled("class", "noisy", "cleaned", "added", "removed",
                   title=f"{result['changed_images']} of {result['total_images']} images "
                         f"changed ({result['text']})")
    for name, c in result["per_class"].items():
        table.add_row(name, str(c["noisy"]), str(c["cleaned"]), str(c["added"]),
                      str(c["removed"]))
    table.add_section()
    table.add_row("total", "", "", str(result["added"]), str(result["removed"]), style="bold")
    _console().print(table)


@app.command()
def stats(
    cache: Path = typer.Argument(..., help="Pseudo-label cache."),
    truth: str = typer.Option(..., "--truth", help='Ground-truth tags: JSON Lines {"id": ..., '
                              '"tags": \\[names]}, or a dis manifest of the same images (its '
                              'tags from labelmaps, not captions); - = stdin.'),
    threshold: float | None = THRESHOLD,
    json_out: bool = JSON,
) -> None:
    """Precision, recall and F1 (per class, micro) of noisy and cleaned tags vs ground truth."""
    from discli.cli.output import table as titled

    from discli.pseudo import tags
    from discli.cli.output import warn

    store = tags.open_cache(cache)
    result = tags.tag_stats(store, tags.read_truth(truth, store.classes),
                            _rule(cache, threshold), truth)
    if result["missing_truth"]:
        warn(f"{result['missing_truth']} image(s) of the cache have no ground truth in {truth} "
             f"and are left out (e.g. {', '.join(result['missing_examples'])})")
    if json_out:
        print_json(result)
        return
    table = titled("class", "support", "noisy P", "noisy R", "noisy F1", "clean P", "clean R",
                   "clean F1", title=f"{result['images']} images, {result['text']}")
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    for name, n in result["noisy"]["per_class"].items():
        c = result["cleaned"]["per_class"][name]
        table.add_row(name, str(n["support"]), pct(n["precision"]), pct(n["recall"]),
                      pct(n["f1"]), pct(c["precision"]), pct(c["recall"]), pct(c["f1"]))
    table.add_section()
    n, c = result["noisy"]["micro"], result["cleaned"]["micro"]
    table.add_row("micro", str(n["tp"] + n["fn"]), pct(n["precision"]), pct(n["recall"]),
                  pct(n["f1"]), pct(c["precision"]), pct(c["recall"]), pct(c["f1"]),
                  style="bold")
    _console().print(table)


@app.command()
def run(
    manifest: Path = typer.Argument(..., help="Tagged manifest (JSON Lines)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Model checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", parser=opt.output_file,
                             help="Cache file to write (cache.h5)."),
    t_tr: int | None = typer.Option(None, "--t-tr", min=0, max=MAX_STEPS, help="Training-time "
                                    "inference iterations (default: the checkpoint's)."),
    split: str | None = typer.Option(None, "--split", help="Only records of this split."),
    threshold: float | None = THRESHOLD,
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute an existing cache."),
    batch_size: int = opt.InfBatchOpt,
    num_workers: int = opt.InfWorkersOpt,
    old_workers: int | None = opt.InfOldWorkersOpt,
    device: str | None = opt.InfDeviceOpt,
    amp: bool = opt.InfAmpOpt,
    lr: float | None = opt.InfLrOpt,
    momentum: float | None = opt.InfMomentumOpt,
    tag_weight: float | None = typer.Option(None, "--tag-weight", help="Weight of the noisy-tag "
                                            "loss in inference (default: the checkpoint's)."),
    json_out: bool = JSON,
    quiet: bool = opt.InfQuietOpt,
) -> None:
    """Compute cleaned tags for a tagged manifest (one E-step, no finetune).

    The inference settings not given here come from the checkpoint (those it was trained with).
    """
    opt.check_inputs([(manifest, None)], checkpoint)  # before torch is imported
    from discli.train.clean import CleanSettings, run_clean
    from discli.train.estep import Execution

    overrides = {"lr": lr, "momentum": momentum, "tag_weight": tag_weight}
    workers = num_workers if old_workers is None else old_workers  # --workers: older spelling
    settings = CleanSettings(t_tr=t_tr, overrides=overrides,
                             threshold=0.5 if threshold is None else threshold)
    execution = Execution(batch_size=batch_size, device=device, num_workers=workers, amp=amp)
    with RichReporter(quiet=quiet) as reporter:
        result = run_clean(checkpoint, manifest, out, settings, execution, split=split,
                           overwrite=overwrite, reporter=reporter)
    if json_out:
        print_json(result)
        return
    typer.echo(f"{result['cache']}: {result['total_images']} images, "
               f"{result['changed_images']} with changed tags ({result['added']} added, "
               f"{result['removed']} removed, {result['text']})"
               + (" [existing cache reused]" if result["reused"] else ""))
