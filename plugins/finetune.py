"""`dis finetune`: stage 2, rounds of E-step (pseudo-label cache) and M-step."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins._render import training_output
from discli.cli.output import RichReporter


def finetune(
    labelled: Path | None = opt.LabelledOpt,
    tagged: Path | None = opt.key_option("tagged", help="manifest of tagged images (required, "
                                            "unless --config sets tagged)", show_default=False),
    out: Path = opt.OutOpt,
    init: Path | None = opt.key_option("init", show_default=False),
    t_tr: int | None = opt.key_option("t_tr", min=0),
    rounds: int | None = opt.key_option("rounds", min=0),
    mstep_iters: int | None = opt.key_option("mstep_iters", min=0),
    tagged_ratio: float | None = opt.key_option("tagged_ratio"),
    only: str | None = typer.Option(None, "--only", help="Run only 'estep' or 'mstep'.",
                                       show_default="both"),
    round_: int | None = typer.Option(None, "--round", help="Run only this round.",
                                         show_default="every round"),
    force: bool = typer.Option(False, "--force", help="Use a cache made by another checkpoint."),
    backbone: str | None = opt.BackboneOpt,
    batch_size: int | None = opt.BatchOpt,
    crop_size: int | None = opt.CropOpt,
    lr: float | None = opt.LrOpt,
    seed: int | None = opt.SeedOpt,
    device: str | None = opt.DeviceOpt,
    num_workers: int | None = opt.WorkersOpt,
    amp: bool | None = opt.AmpOpt,
    root: Path | None = opt.RootOpt,
    val: Path | None = opt.ValOpt,
    val_every: int | None = opt.ValEveryOpt,
    config: Path | None = opt.ConfigOpt,
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

    The defaults shown below are the library's; a --config preset sets its own
    (`dis config show demo` lists them), and an option given here wins over both.
    """
    cfg = opt.build_config(config, sets, section="finetune", labelled=labelled, tagged=tagged,
                           out=out, init=init, t_tr=t_tr, rounds=rounds, mstep_iters=mstep_iters,
                           tagged_ratio=tagged_ratio, backbone=backbone, batch_size=batch_size,
                           crop_size=crop_size, lr=lr, seed=seed, device=device,
                           num_workers=num_workers, amp=amp, root=root, val=val,
                           val_every=val_every)
    opt.train_inputs(cfg, "finetune")  # before torch is imported
    from discli.distributed import dist_info
    from discli.train.finetune import finetune as run_finetune

    main_rank = dist_info().is_main  # under torchrun only rank 0 talks
    with RichReporter(quiet=quiet or not main_rank) as reporter, \
            opt.no_empty_run_folder(cfg.out, "finetune"):
        summary = run_finetune(cfg, only=only, round_=round_, reporter=reporter, force=force,
                               tensorboard=tensorboard)
    if main_rank:
        training_output("finetune", summary, json_out, quiet)
