"""`dis evaluate`: VOC mIoU, pixel accuracy and boundary F of several t_ts in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dis_plugins import options as opt
from discli.cli.output import RichReporter, print_json


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def render(report: dict[str, Any]) -> None:
    from discli.cli.output import console
    from discli.cli.output import table as titled

    setups = report["setups"]
    table = titled(title=f"{report['manifest']} ({report['images']} images)")
    table.add_column("class")
    for setup in setups:
        table.add_column(setup["name"], justify="right")
    for name in report["classes"]:
        table.add_row(name, *[_pct(s["iou"][name]) for s in setups])
    table.add_section()
    table.add_row("mIoU", *[_pct(s["miou"]) for s in setups], style="bold")
    table.add_row("pixel acc", *[_pct(s["pixel_acc"]) for s in setups])
    table.add_row(f"boundary F ({report['boundary_tolerance']:g}px)",
                  *[_pct(s["boundary"]["f1"]) for s in setups])
    table.add_row("ms/image (one pass)", *[f"{s['ms_per_image']:.1f}" for s in setups])
    console().print(table)


def evaluate(
    manifest: Path | None = typer.Argument(None, help="Manifest with labelmaps (JSON Lines)."),
    manifest_opt: Path | None = typer.Option(None, "--manifest", "-m", help="The manifest, as "
                                             "an option (instead of the argument)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Model checkpoint."),
    t_ts: str | None = typer.Option(None, "--t-ts", help="Comma-separated test-time iteration "
                                    "counts, e.g. 0,10,30: all from one pass, plus their "
                                    "ensemble (default: the checkpoint's t_ts)."),
    split: str | None = typer.Option(None, "--split", help="Only records of this split."),
    root: Path | None = typer.Option(None, "--root", help="Override the manifest's root."),
    ensemble: bool = typer.Option(True, "--ensemble/--no-ensemble", help="Also score the "
                                  "average of the setups' probabilities (with 2+ t values)."),
    boundary_tol: float = typer.Option(2.0, "--boundary-tol", min=0, help="Boundary F "
                                       "matching tolerance in pixels."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N images."),
    batch_size: int = opt.InfBatchOpt,
    num_workers: int = opt.InfWorkersOpt,
    old_workers: int | None = opt.InfOldWorkersOpt,
    device: str | None = opt.InfDeviceOpt,
    amp: bool = opt.InfAmpOpt,
    compile_steps: bool = opt.InfCompileOpt,
    lr: float | None = opt.InfLrOpt,
    momentum: float | None = opt.InfMomentumOpt,
    scales: str = opt.ScalesOpt,
    flip: bool = opt.FlipOpt,
    save_dir: Path | None = typer.Option(None, "--save-dir", help="Also write the scored "
                                         "predictions: <setup>/<id>.png (VOC palette), "
                                         "<setup>/<id>_overlay.jpg (--overlay-format), and "
                                         "confusion.png."),
    opacity: float = typer.Option(0.5, "--opacity", min=0.0, max=1.0, help="Overlay colour "
                                  "weight over labelled non-background pixels (--save-dir)."),
    overlay_format: str = opt.OverlayFormatOpt,
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout (with "
                                  "each setup's confusion matrix: rows true, columns predicted, "
                                  "pixels)."),
    quiet: bool = opt.InfQuietOpt,
) -> None:
    """Score a checkpoint on a labelled manifest (mIoU, pixel accuracy, boundary F).

    VOC protocol: one confusion matrix over the whole set, 255 ignored; mIoU is the mean over the
    classes with ground-truth or predicted pixels. The inference settings not given here come
    from the checkpoint (those it was trained with). Under torchrun the ranks share the images and
    rank 0 alone prints the report of the whole set.
    """
    from discli.errors import UsageError
    from discli.infer.visual import check_overlay_format

    if (manifest is None) == (manifest_opt is None):
        raise UsageError("give the manifest once: as the argument or with --manifest")
    manifest = manifest or manifest_opt
    check_overlay_format(overlay_format)
    steps = opt.steps_of(t_ts)  # the options first (exit 2), then the files (exit 3)
    view_scales = opt.scales_of(scales)
    opt.check_inputs([(manifest, root)], checkpoint)  # before torch is imported
    from discli.infer.settings import use_compiled

    use_compiled(compile_steps)
    from discli.distributed import dist_info
    from discli.evaluation.evaluate import EvalOutputs, Scoring, evaluate_checkpoint
    from discli.infer.runtime import InferenceOverrides, RunOptions, Views

    workers = num_workers if old_workers is None else old_workers  # --workers: older spelling
    scoring = Scoring(steps=steps, ensemble=ensemble, boundary_tolerance=boundary_tol,
                      split=split, limit=limit)
    run = RunOptions(batch_size=batch_size, device=device, amp=amp,
                     views=Views(view_scales, flip), num_workers=workers)
    outputs = EvalOutputs(save_dir=save_dir, opacity=opacity, overlay_format=overlay_format)
    main = dist_info().is_main  # rank 0 alone prints
    with RichReporter(quiet=quiet or not main) as reporter:
        report = evaluate_checkpoint(checkpoint, manifest, root=root, scoring=scoring,
                                     given=InferenceOverrides(lr=lr, momentum=momentum),
                                     run=run, outputs=outputs, reporter=reporter)
    if not main:
        return
    if json_out:
        print_json(report)
    else:
        render(report)
        if save_dir is not None:
            typer.echo(f"predictions and confusion.png written to {save_dir}")
