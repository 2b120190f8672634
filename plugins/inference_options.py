"""Options shared by the commands that run inference on a checkpoint (`dis infer`, `dis evaluate`,
`dis clean-tags run`)."""

from __future__ import annotations

import typer

from discli.inference import InferenceConfig

_DEFAULTS = InferenceConfig()

BatchOpt = typer.Option(8, "--batch-size", "-b", min=1, help="Images per batch (images of one "
                        "size only).")
WorkersOpt = typer.Option(0, "--workers", min=0, help="DataLoader worker processes.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available).")
AmpOpt = typer.Option(True, "--amp/--no-amp", help="float16 backbone forward on CUDA.")
LrOpt = typer.Option(_DEFAULTS.lr, "--lr", help="Inference step size.")
MomentumOpt = typer.Option(_DEFAULTS.momentum, "--momentum", help="Inference momentum.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
