"""`dis finetune`: stage 2, rounds of E-step (pseudo-label cache) and M-step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dis_plugins import train_options as opt
from discli.cli.output import RichReporter, print_json


def finetune(
    labelled: Optional[Path] = opt.LabelledOpt,
    tagged: Optional[Path] = opt.key_option("tagged", help="manifest of tagged images (required, "
                                            "unless --config sets tagged)", show_default=False),
    out: Path = opt.OutOpt,
    init: Optional[Path] = opt.key_option("init", show_default=False),
    t_tr: Optional[int] = opt.key_option("t_tr", min=0),
    rounds: Optional[int] = opt.key_option("rounds", min=0),
    mstep_iters: Optional[int] = opt.key_option("mstep_iters", min=0),
    tagged_ratio: Optional[float] = opt.key_option("tagged_ratio"),
    only: Optional[str] = typer.Option(None, "--only", help="Run only 'estep' or 'mstep'.",
                                       show_default="both"),
    round_: Optional[int] = typer.Option(None, "--round", help="Run only this round.",
                                         show_default="every round"),
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
    tensorboard: bool = opt.TensorBoardOpt,
    json_out: bool = opt.JsonOpt,
    quiet: bool = opt.QuietOpt,
) -> None:
    """Fine-tune on pixel-labelled + tagged images (the dual loop of section 3.1).

    Each round: E-step (inferred labelmaps and cleaned tags -> round-N/cache.h5), then M-step.
    Re-running continues where it stopped (other settings are refused; more --rounds extend it).
    --only/--round run one piece.
    A table of the rounds goes to stderr, the final checkpoint's path to stdout.
    """
    cfg = opt.build_config(config, sets, section="finetune", labelled=labelled, tagged=tagged,
                           out=out, init=init, t_tr=t_tr, rounds=rounds, mstep_iters=mstep_iters,
                           tagged_ratio=tagged_ratio, backbone=backbone, batch_size=batch_size,
                           crop_size=crop_size, lr=lr, seed=seed, device=device,
                           num_workers=num_workers, amp=amp, root=root, val=val,
                           val_every=val_every)
    from discli.distributed import dist_info
    from discli.train.finetune import finetune as run_finetune

    main_rank = dist_info().is_main  # under torchrun only rank 0 talks
    with RichReporter(quiet=quiet or not main_rank) as reporter:
        summary = run_finetune(cfg, only=only, round_=round_, reporter=reporter, force=force,
                               tensorboard=tensorboard)
    if not main_rank:
        return
    if json_out:
        print_json(summary)
        return
    if not quiet:
        from dis_plugins._render import train_summary

        train_summary("finetune", summary)
    if "checkpoint" in summary:
        sys.stdout.write(summary["checkpoint"] + "\n")
