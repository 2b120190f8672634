"""The training loop shared by pretrain's three steps and finetune's M-steps.

As torchvision's reference scripts do, a phase is set up first (:func:`setup_phase`: the
trainable parameters, synchronised BatchNorm and DDP under torchrun, the optimiser, the poly
schedule, the AMP scaler, and the state of the checkpoint it continues), then its iterations run
(:func:`train_iterations`, their ``train_one_epoch``) and it is checkpointed.

Determinism and resume. The data order is a pure function of (seed, iteration)
(:mod:`discli.train.batches`) and a checkpoint holds the random generators
(:mod:`discli.train.rng`), so a run resumed from the checkpoint of iteration ``k`` sees exactly
the batches ``k+1, k+2, ...`` of an uninterrupted run and on CPU ends with bit-identical weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader

from discli.storage import atomic_write
from discli.infer.checkpoint import save_checkpoint
from discli.distributed import DistInfo, all_reduce_sum
from discli.errors import Interrupted, TrainingDivergedError
from discli.model.net import DISNet
from discli.progress import NullReporter, Reporter
from discli.train.batches import Source, planned_loader
from discli.train.keys import TrainConfig
from discli.train.phases import Phase, compute_losses, param_groups, set_train_modes
from discli.train.interrupts import DeferredInterrupts
from discli.train.rng import rng_state, set_rng_state
from discli.train.runlog import TensorBoardMirror, append


# ----------------------------------------------------------------------------- schedule
def poly(total: int, power: float, warmup: int = 0):  # noqa: ANN201 - a LambdaLR factor
    """Poly decay to 0 over ``total`` iterations, after a linear warm-up of ``warmup``."""
    def factor(it: int) -> float:
        ramp = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        return ramp * (1.0 - min(it, total) / max(total, 1)) ** power
    return factor


@dataclass(frozen=True)
class Schedule:
    """How long a phase trains, and how fast: ``iters`` iterations at every learning rate of the
    configuration times ``lr_scale``, warmed up linearly over ``warmup`` iterations, then
    decayed (:func:`poly`)."""

    iters: int
    lr_scale: float = 1.0
    warmup: int = 0


# ----------------------------------------------------------------------------- validation
def validate(model: DISNet, cfg: TrainConfig, device: torch.device) -> float:
    """mIoU (t = 0) of the model on ``cfg.val``; the RNG state is left as it was, so a run with
    validation trains exactly as one without."""
    from discli.data.manifest import read_manifest
    from discli.evaluation.evaluate import Scoring, evaluate
    from discli.infer.runtime import RunOptions

    manifest = read_manifest(cfg.val, root=cfg.root or None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        report = evaluate(unwrap(model), manifest, Scoring(steps=[0], ensemble=False),
                          run=RunOptions(device=device))
    return float(report["setups"][0]["miou"])


# ----------------------------------------------------------------------------- state
def unwrap(model: nn.Module) -> DISNet:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


@dataclass
class PhaseRun:
    """Where a phase's checkpoints, log and progress go, what else to store in its checkpoints,
    and the state of ``checkpoint`` that it continues."""

    checkpoint: Path
    log: Path
    stage: str
    extra: dict[str, Any]
    classes: list[str]
    mirror: TensorBoardMirror | None = None  # log records also go to TensorBoard
    resume: dict[str, Any] | None = None  # None: the phase starts at iteration 0
    reporter: Reporter | None = None


def _trim_log(path: Path, run: PhaseRun, phase: str, upto: int) -> None:
    """Before (re)starting a phase at iteration ``upto``, drop its log lines past that point:
    a killed attempt may have logged iterations it never checkpointed, and they will be redone.
    Lines of other stages, phases, steps and rounds are kept."""
    if not path.exists():
        return
    this = {"stage": run.stage, "phase": phase,
            **{k: v for k, v in run.extra.items() if k in ("step", "round")}}
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if any(rec.get(k) != v for k, v in this.items()) or rec.get("iter", 0) <= upto:
            kept.append(line)
    atomic_write(path, lambda f: f.write(("\n".join(kept) + "\n" if kept else "")
                                               .encode()))


def check_finite(values: dict[str, float], iteration: int, run: PhaseRun, phase: Phase,
                 cfg: TrainConfig, dist: DistInfo) -> None:
    """Stop on a NaN or infinite loss of any rank (every rank stops at the same iteration)."""
    bad = not all(math.isfinite(v) for v in values.values())
    if dist.enabled:
        bad = bool(all_reduce_sum(torch.tensor([float(bad)])).item())
    if not bad:
        return
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    hints = [] if cfg.clip_grad_norm > 0 else ["clip_grad_norm = 1"]
    if run.stage == "pretrain" and cfg.warmup_iters == 0:
        hints.append("warmup_iters = 100")
    hints.append("a lower lr")
    raise TrainingDivergedError(
        f"{run.stage} {phase.name}: the loss is not finite at iteration {iteration} ({shown}; "
        f"on this rank); nothing of that iteration was saved, the checkpoint before it is "
        f"intact. Try {', '.join(hints)}", run.checkpoint)


def _fetch(loader: DataLoader, interrupts: DeferredInterrupts) -> Iterator[dict[str, Any]]:
    """The loader's batches; they end early when a fetch fails after SIGINT or SIGTERM: Ctrl-C
    reaches the DataLoader's worker processes too, and the batch they no longer send is the
    interruption, not an error of its own."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception:
            if interrupts.signum is None:
                raise
            return
        yield batch


# ----------------------------------------------------------------------------- a phase
@dataclass
class PhaseTraining:
    """One phase set up to train (:func:`setup_phase`): the model and ``net`` (the same model,
    wrapped by DDP under torchrun), what trains it, and where it writes."""

    model: DISNet
    net: nn.Module
    phase: Phase
    cfg: TrainConfig
    schedule: Schedule
    run: PhaseRun
    device: torch.device
    dist: DistInfo
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool
    reporter: Reporter

    def state(self, iteration: int, done: bool) -> dict[str, Any]:
        """The checkpoint after ``iteration`` (``done``: the phase's last)."""
        return {"model": unwrap(self.model).state_dict(),
                "model_config": unwrap(self.model).config.to_dict(),
                "classes": self.run.classes, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.use_amp else {},
                "stage": self.run.stage, "phase": self.phase.name, "iteration": iteration,
                "total_iters": self.schedule.iters, "done": done,
                "rng": rng_state(self.device), "config": self.cfg.to_dict(),
                "inference": self.cfg.inference_settings(), **self.run.extra}


def _optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, lr_scale: float
               ) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr * lr_scale, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def setup_phase(model: DISNet, phase: Phase, cfg: TrainConfig, schedule: Schedule,
                run: PhaseRun, device: torch.device, dist: DistInfo) -> PhaseTraining:
    """The phase's trainable parameters at their learning rates, synchronised BatchNorm and DDP
    under torchrun, the optimiser, the schedule and the AMP scaler (fresh: see
    :func:`resume_phase`)."""
    reporter = run.reporter or NullReporter()
    groups = param_groups(model, phase, cfg)
    for group in groups:
        group["lr"] = group["base_lr"] = group["lr"] * schedule.lr_scale
    net: nn.Module = model
    if dist.enabled and cfg.sync_bn and device.type == "cuda":
        # BatchNorm statistics of the global batch rather than of each rank's few images (in
        # place: the checkpoint keeps the same keys; in eval mode SyncBatchNorm is BatchNorm)
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(groups, cfg, schedule.lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly(schedule.iters, cfg.poly_power, schedule.warmup))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return PhaseTraining(model=model, net=net, phase=phase, cfg=cfg, schedule=schedule, run=run,
                         device=device, dist=dist, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, use_amp=use_amp, reporter=reporter)


def resume_phase(t: PhaseTraining) -> int:
    """Continue ``t.run.resume`` (if any): the optimiser, schedule, scaler and random generators
    as they were after its iteration, which is returned (0: the phase starts afresh)."""
    resume, run = t.run.resume, t.run
    if resume is None:
        return 0
    t.optimizer.load_state_dict(resume["optimizer"])
    t.scheduler.load_state_dict(resume["scheduler"])
    if resume.get("scaler"):
        t.scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"], t.device)
    start = int(resume["iteration"])
    # one line through the reporter (the CLI prints it on stderr): a re-run that silently
    # skipped work, or silently redid it, could not be told apart
    place = " ".join(f"{k} {v}" for k, v in run.extra.items() if k in ("step", "round"))
    if "step" not in run.extra:  # pretrain's phases are its steps; a round has phases
        place = f"{place} {t.phase.name}".strip()
    t.reporter.log(f"resuming {run.stage} {place} at iteration {start} of {t.schedule.iters} "
                   f"(from {run.checkpoint})")
    return start


def train_step(t: PhaseTraining, batch: dict[str, Any], iteration: int) -> dict[str, float]:
    """One iteration's optimisation; returns the values of its losses."""
    with torch.autocast(t.device.type, dtype=torch.float16, enabled=t.use_amp):
        losses = compute_losses(t.net, batch, t.phase, t.cfg, t.device)
    values = {k: float(v.detach()) for k, v in losses.items()}
    check_finite(values, iteration, t.run, t.phase, t.cfg, t.dist)  # before any weight changes
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(losses["loss"]).backward()
    if t.cfg.clip_grad_norm > 0:
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the AMP-scaled ones
        nn.utils.clip_grad_norm_(t.net.parameters(), t.cfg.clip_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return values


def _validate_at(t: PhaseTraining, iteration: int) -> None:
    run, name = t.run, t.phase.name
    val_miou = validate(t.model, t.cfg, t.device)
    set_train_modes(t.model, t.phase, t.cfg.freeze_bn)
    if t.dist.is_main:
        append(run.log, {"stage": run.stage, "phase": name, "iter": iteration,
                         "val_miou": val_miou, **run.extra}, run.mirror)
    t.reporter.log(f"{run.stage} {name} iteration {iteration}: validation mIoU "
                   f"{100 * val_miou:.1f}")


def after_step(t: PhaseTraining, iteration: int, values: dict[str, float], tic: float) -> None:
    """What follows an iteration: progress, the log record, validation, the periodic
    checkpoint."""
    cfg, run, total = t.cfg, t.run, t.schedule.iters
    lr = t.optimizer.param_groups[-1]["lr"]
    t.reporter.advance(1, loss=values["loss"], lr=lr)
    if t.dist.is_main and (iteration % cfg.log_every == 0 or iteration == total):
        record = {"stage": run.stage, "phase": t.phase.name, "iter": iteration, "lr": lr,
                  "time": round(time.perf_counter() - tic, 3), **values, **run.extra}
        append(run.log, record, run.mirror)
    if cfg.val and (iteration == total or (cfg.val_every and iteration % cfg.val_every == 0)):
        _validate_at(t, iteration)
    if iteration < total and iteration % cfg.ckpt_every == 0 and t.dist.is_main:
        save_checkpoint(run.checkpoint, t.state(iteration, done=False))


def train_iterations(t: PhaseTraining, loader: DataLoader, start: int,
                     interrupts: DeferredInterrupts) -> tuple[int, bool]:
    """The phase's iterations after ``start``, as far as the loader goes (torchvision's
    ``train_one_epoch``); returns the last finished one (its state is safe to save) and whether
    a signal asked to stop after it."""
    tic = time.perf_counter()
    finished = start
    for iteration, batch in enumerate(_fetch(loader, interrupts), start=start + 1):
        values = train_step(t, batch, iteration)
        after_step(t, iteration, values, tic)
        finished = iteration
        if interrupts.stop(t.dist):
            return finished, True
    return finished, False


def _keep_and_stop(t: PhaseTraining, start: int, finished: int, signum: int | None) -> NoReturn:
    """Stopped early by SIGINT / SIGTERM: checkpoint what is done, then raise Interrupted."""
    run, where = t.run, f"{t.run.stage} {t.phase.name}"
    kept = f"no iteration of {where} had finished"
    if finished > 0:
        if finished > start and finished % t.cfg.ckpt_every and t.dist.is_main:
            save_checkpoint(run.checkpoint, t.state(finished, done=False))
        kept = f"kept {run.checkpoint} at {where} iteration {finished} of {t.schedule.iters}"
    raise Interrupted(signum, f"{kept}; rerun the same command to continue from there (files "
                              f"of finished steps and rounds are kept)")


def run_phase(model: DISNet, phase: Phase, sources: Sequence[Source], cfg: TrainConfig,
              schedule: Schedule, run: PhaseRun, device: torch.device,
              dist: DistInfo = DistInfo()) -> dict[str, Any]:
    """Train one phase over ``schedule`` (continuing ``run.resume`` if given); returns the final
    checkpoint state (also written to ``run.checkpoint``)."""
    t = setup_phase(model, phase, cfg, schedule, run, device, dist)
    start = resume_phase(t)
    if dist.is_main:
        _trim_log(run.log, run, phase.name, start)
    loader = planned_loader(sources, cfg, start, schedule.iters, device, dist)
    set_train_modes(model, phase, cfg.freeze_bn)
    t.reporter.start(f"{run.stage} {phase.name}", schedule.iters)
    t.reporter.advance(start)
    with DeferredInterrupts() as interrupts:
        finished, stopped = train_iterations(t, loader, start, interrupts)
        if finished < schedule.iters:
            _keep_and_stop(t, start, finished, interrupts.signum)
    final = t.state(schedule.iters, done=True)
    if dist.is_main:
        save_checkpoint(run.checkpoint, final)
    if stopped:  # the signal came during the last iteration: the phase is whole, stop after it
        raise Interrupted(interrupts.signum, f"{run.stage} {phase.name} finished: kept "
                                             f"{run.checkpoint}; rerun the same command to "
                                             f"continue from there")
    return final
