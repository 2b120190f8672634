"""`dis pretrain`: stage 1, the three fully supervised steps of section 3."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dis_plugins import train_options as opt
from discli.cli.output import RichReporter, print_json
from discli.distributed import dist_info
from discli.train.pretrain import pretrain as run_pretrain


def pretrain(
    labelled: Optional[Path] = opt.LabelledOpt,
    out: Optional[Path] = opt.OutOpt,
    step: list[int] = typer.Option([], "--step", help="Run only this step (1, 2 or 3); "
                                   "repeatable. Default: all remaining steps."),
    iters: Optional[list[int]] = typer.Option(None, "--iters", help="Iterations of steps 1, 2, "
                                              "3 (give three times), e.g. --iters 1000 "
                                              "--iters 300 --iters 500."),
    backbone: Optional[str] = opt.BackboneOpt,
    backbone_weights: Optional[str] = opt.WeightsOpt,
    batch_size: Optional[int] = opt.BatchOpt,
    crop_size: Optional[int] = opt.CropOpt,
    lr: Optional[float] = opt.LrOpt,
    seed: Optional[int] = opt.SeedOpt,
    device: Optional[str] = opt.DeviceOpt,
    num_workers: Optional[int] = opt.WorkersOpt,
    amp: Optional[bool] = opt.AmpOpt,
    root: Optional[Path] = opt.RootOpt,
    val: Optional[Path] = opt.ValOpt,
    val_every: Optional[int] = opt.ValEveryOpt,
    config: Optional[Path] = opt.ConfigOpt,
    sets: list[str] = opt.SetOpt,
    json_out: bool = opt.JsonOpt,
    quiet: bool = opt.QuietOpt,
) -> None:
    """Pretrain on pixel-labelled images: (1) backbone + subnets 1, 3; (2) subnet 2; (3) all.

    Re-running the same command on the same --out continues where it stopped.
    """
    step_iters = {}
    if iters:
        if len(iters) != 3:
            raise typer.BadParameter("give --iters three times (steps 1, 2, 3)")
        step_iters = {"iters_step1": iters[0], "iters_step2": iters[1], "iters_step3": iters[2]}
    cfg = opt.build_config(config, sets, section="pretrain", labelled=labelled, out=out,
                           backbone=backbone, backbone_weights=backbone_weights,
                           batch_size=batch_size,
                           crop_size=crop_size, lr=lr, seed=seed, device=device,
                           num_workers=num_workers, amp=amp, root=root, **step_iters, val=val,
                           val_every=val_every)
    main_rank = dist_info().is_main  # under torchrun only rank 0 talks
    with RichReporter(quiet=quiet or not main_rank) as reporter:
        summary = run_pretrain(cfg, steps=step or (1, 2, 3), reporter=reporter)
    if not main_rank:
        return
    if json_out:
        print_json(summary)
    else:
        reporter.log(f"pretrain: {summary['steps']} -> {summary.get('checkpoint', summary['out'])}")
