"""`dis pretrain`: stage 1, the three fully supervised steps of section 3."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins._render import training_output
from discli.cli.output import RichReporter

_ITERS = ",".join(opt.shown_default(f"iters_step{s}") for s in (1, 2, 3))


def pretrain(
    labelled: Path | None = opt.LabelledOpt,
    out: Path = opt.OutOpt,
    step: list[str] = typer.Option([], "--step", metavar="1,2,3", help="Run only these steps "
                                   "(1, 2, 3), e.g. --step 2,3.", show_default="all remaining"),
    iters: list[str] | None = typer.Option(None, "--iters", metavar="N1,N2,N3",
                                              help="Iterations of steps 1, 2 and 3, e.g. "
                                              "--iters 1000,300,500 (keys iters_step1..3).",
                                              show_default=_ITERS),
    backbone: str | None = opt.BackboneOpt,
    backbone_weights: str | None = opt.WeightsOpt,
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
    """Pretrain on pixel-labelled images: (1) backbone + subnets 1, 3; (2) subnet 2; (3) all.

    Re-running the same command on the same --out continues where it stopped.
    Other settings are refused.
    A table of the steps goes to stderr, the final checkpoint's path to stdout.

    The defaults shown below are the library's; a --config preset sets its own
    (`dis config show demo` lists them), and an option given here wins over both.
    """
    step_iters = {}
    if iters:
        counts = opt.parse_ints(iters, "--iters")
        if len(counts) != 3:
            raise typer.BadParameter("give the iterations of steps 1, 2 and 3, e.g. "
                                     "--iters 1000,300,500", param_hint="--iters")
        step_iters = dict(zip(("iters_step1", "iters_step2", "iters_step3"), counts))
    cfg = opt.build_config(config, sets, section="pretrain", labelled=labelled, out=out,
                           backbone=backbone, backbone_weights=backbone_weights,
                           batch_size=batch_size, crop_size=crop_size, lr=lr, seed=seed,
                           device=device, num_workers=num_workers, amp=amp, root=root,
                           **step_iters, val=val, val_every=val_every)
    opt.train_inputs(cfg, "pretrain")  # before torch is imported
    from discli.distributed import dist_info
    from discli.train.pretrain import pretrain as run_pretrain

    main_rank = dist_info().is_main  # under torchrun only rank 0 talks
    with RichReporter(quiet=quiet or not main_rank) as reporter, \
            opt.no_empty_run_folder(cfg.out, "pretrain"):
        summary = run_pretrain(cfg, steps=opt.parse_ints(step, "--step") or (1, 2, 3),
                               reporter=reporter, tensorboard=tensorboard)
    if main_rank:
        training_output("pretrain", summary, json_out, quiet)
