"""`dis infer`: labelmaps for images, folders, a manifest or a list of paths on stdin."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from discli.cli.output import RichReporter, print_json


def infer(
    inputs: list[str] = typer.Argument(..., help="Image files, folders, a manifest, or - to read "
                                       "paths (one per line) from stdin."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Model checkpoint."),
    out: Path | None = typer.Option(None, "--out", "-o", parser=opt.output_folder,
                                    help="Output folder: <id>.png (class indices), "
                                    "<id>_color.png (VOC palette), <id>_overlay.jpg "
                                    "(--overlay)."),
    t_ts: str | None = typer.Option(None, "--t-ts", help="Test-time inference iterations, "
                                    "comma-separated as for evaluate (0 = plain forward; "
                                    "default: the checkpoint's t_ts). Several values write "
                                    "one subfolder each under --out (t0/, t30/)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write image/labelmap blends."),
    overlay_format: str = opt.OverlayFormatOpt,
    opacity: float = typer.Option(0.5, "--opacity", min=0.0, max=1.0, help="Overlay colour "
                                  "weight over labelled non-background pixels (background "
                                  "pixels stay as they are)."),
    probs: Path | None = typer.Option(None, "--probs", parser=opt.output_file,
                                      help="HDF5 file for class and tag probabilities."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute images whose outputs "
                                   "already exist (default: skip them)."),
    batch_size: int = opt.InfBatchOpt,
    device: str | None = opt.InfDeviceOpt,
    amp: bool = opt.InfAmpOpt,
    compile_steps: bool = opt.InfCompileOpt,
    lr: float | None = opt.InfLrOpt,
    momentum: float | None = opt.InfMomentumOpt,
    scales: str = opt.ScalesOpt,
    flip: bool = opt.FlipOpt,
    json_out: bool = typer.Option(False, "--json", help="One JSON summary line per image on "
                                  "stdout."),
    quiet: bool = opt.InfQuietOpt,
) -> None:
    """Predict labelmaps at each image's own resolution (batched by size, resumable).

    The inference settings not given here come from the checkpoint (those it was trained
    with). Under torchrun the ranks share the images; rank 0 alone prints (every image's summary).
    """
    from discli.errors import UsageError

    if out is None and probs is None and not json_out:
        raise UsageError("nothing to write: pass --out DIR, --probs FILE and/or --json")
    from discli.infer.visual import check_overlay_format

    check_overlay_format(overlay_format)
    steps = opt.steps_of(t_ts)  # the options first (exit 2), then the files (exit 3)
    view_scales = opt.scales_of(scales)
    opt.check_inputs(checkpoint=checkpoint)  # before torch is imported
    from discli.infer.settings import use_compiled

    use_compiled(compile_steps)
    from discli.distributed import dist_info
    from discli.infer.inputs import InferOutputs
    from discli.infer.predict import infer_checkpoint
    from discli.infer.runtime import InferenceOverrides, RunOptions, Views

    outputs = InferOutputs(out_dir=out, overlay=overlay, overlay_format=overlay_format,
                           opacity=opacity, probs_path=probs, overwrite=overwrite)
    run = RunOptions(batch_size=batch_size, device=device, amp=amp,
                     views=Views(view_scales, flip))
    main = dist_info().is_main  # rank 0 reports every image
    written = skipped = 0
    with RichReporter(quiet=quiet or not main) as reporter:
        for summary in infer_checkpoint(inputs, checkpoint, t_ts=steps,
                                        given=InferenceOverrides(lr=lr, momentum=momentum),
                                        outputs=outputs, run=run, reporter=reporter):
            if not main:
                continue
            skipped += summary["skipped"]
            written += not summary["skipped"]
            if json_out:
                print_json(summary)
        reporter.close()
        reporter.log(f"{written} image(s) predicted, {skipped} skipped (outputs already there)"
                     + (f" -> {out}" if out is not None else ""))
