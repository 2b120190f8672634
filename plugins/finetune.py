"""`dis finetune`: stage 2, rounds of E-step (pseudo-label cache) and M-step."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dis_plugins import train_options as opt
from discli.cli.output import RichReporter, print_json
from discli.distributed import dist_info
from discli.train.finetune import finetune as run_finetune


def finetune(
    labelled: Optional[Path] = opt.LabelledOpt,
    tagged: Optional[Path] = typer.Option(None, "--tagged", help="Manifest of tagged images."),
    out: Optional[Path] = opt.OutOpt,
    init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint to start from "
                                        "(default: <out>/pretrain/final.pth)."),
    t_tr: Optional[int] = typer.Option(None, "--t-tr", help="Inference iterations in training "
                                       "(0 = no inference: the ablation)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="E-step/M-step rounds."),
    mstep_iters: Optional[int] = typer.Option(None, "--mstep-iters"),
    tagged_ratio: Optional[float] = typer.Option(None, "--tagged-ratio",
                                                 help="Share of each batch from tagged images."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only 'estep' or 'mstep'."),
    round_: Optional[int] = typer.Option(None, "--round", help="Run only this round."),
    force: bool = typer.Option(False, "--force", help="Use a cache made by another checkpoint."),
    backbone: Optional[str] = opt.BackboneOpt,
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
    """Fine-tune on pixel-labelled + tagged images (the dual loop of section 3.1).

    Each round: E-step (inferred labelmaps and cleaned tags -> round-N/cache.h5), then M-step.
    Re-running continues where it stopped; --only/--round run one piece.
    """
    if t_tr is not None and t_tr < 0:
        raise typer.BadParameter(f"--t-tr must be >= 0, got {t_tr}")
    cfg = opt.build_config(config, sets, section="finetune", labelled=labelled, tagged=tagged,
                           out=out, init=init, t_tr=t_tr, rounds=rounds, mstep_iters=mstep_iters,
                           tagged_ratio=tagged_ratio, backbone=backbone, batch_size=batch_size,
                           crop_size=crop_size, lr=lr, seed=seed, device=device,
                           num_workers=num_workers, amp=amp, root=root, val=val,
                           val_every=val_every)
    main_rank = dist_info().is_main  # under torchrun only rank 0 talks
    with RichReporter(quiet=quiet or not main_rank) as reporter:
        summary = run_finetune(cfg, only=only, round_=round_, reporter=reporter, force=force)
    if not main_rank:
        return
    if json_out:
        print_json(summary)
    else:
        reporter.log(f"finetune: {summary['rounds']} -> {summary.get('checkpoint', summary['out'])}")
