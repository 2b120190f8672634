"""Options shared by the commands that run inference on a checkpoint (`dis infer`, `dis evaluate`,
`dis clean-tags run`).

The inference settings (step, momentum, iterations, tag weight) default to None: a setting not
given on the command line comes from the checkpoint (:func:`discli.checkpoint.inference_settings`:
what the run was trained with, or the library defaults for a checkpoint that carries none).
"""

from __future__ import annotations

import typer

BatchOpt = typer.Option(8, "--batch-size", "-b", min=1, help="Images per batch (images of one "
                        "size only).")
WorkersOpt = typer.Option(0, "--num-workers", "--workers", min=0, help="DataLoader worker "
                          "processes (--workers: the older spelling).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available).")
AmpOpt = typer.Option(True, "--amp/--no-amp", help="float16 backbone forward on CUDA.")
LrOpt = typer.Option(None, "--lr", help="Inference step size (default: the checkpoint's).")
MomentumOpt = typer.Option(None, "--momentum", help="Inference momentum (default: the "
                           "checkpoint's).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
ScalesOpt = typer.Option("1.0", "--scales", help="Multi-scale testing: comma-separated image "
                         "scales whose probabilities are averaged, e.g. 0.5,0.75,1.0,1.25 "
                         "(each with its own feature inference).")
FlipOpt = typer.Option(False, "--flip/--no-flip", help="Also average the mirrored image's "
                       "prediction (mirrored back), at every scale.")
