"""The training loop shared by pretrain's three steps and finetune's M-steps.

Determinism and resume. Which images form iteration ``i``'s batch, and the random augmentation
of each, are pure functions of (seed, i): sample ``j`` of the batch is position ``p = i*B + j``
of an endless stream of seeded epoch permutations, and its augmentation runs under a seed derived
from ``p``. Nothing about the data order has to be saved: a run resumed from the checkpoint of
iteration ``k`` sees exactly the batches ``k+1, k+2, ...`` of an uninterrupted run, so on CPU it
ends with bit-identical weights. Under DDP each rank takes its contiguous slice of the same global
batch, so a global batch ``B`` over ``N`` ranks sees the same images as one process with ``B``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from discli.storage import atomic_write
from discli.infer.checkpoint import save_checkpoint
from discli.distributed import DistInfo, all_reduce_sum
from discli.errors import Interrupted, TrainingDivergedError
from discli.model.losses import map_loss, recon_loss, recon_target, tag_loss
from discli.model.net import DISNet
from discli.progress import NullReporter, Reporter
from discli.train.keys import TrainConfig
from discli.train.interrupts import DeferredInterrupts
from discli.train.runlog import TensorBoardMirror, append


@dataclass(frozen=True)
class Phase:
    name: str
    trainable: tuple[str, ...]  # top-level submodules of DISNet that learn in this phase
    losses: tuple[str, ...]  # subset of ("map", "img", "tag")
    # A phase that trains one part on one loss for that part's sake takes the loss at weight 1,
    # whatever the configured weight (which is about the features, e.g. loss_img = 0 in the M-step).
    unit_weights: bool = False


ALL = ("backbone", "subnet1", "subnet2", "subnet3")
PHASES = {
    # Section 3, fully-supervised stage: (1) backbone + subnets 1 and 3 on labelmaps and tags,
    # (2) subnet-2 alone on reconstruction, (3) everything jointly on all three losses.
    "step1": Phase("step1", ("backbone", "subnet1", "subnet3"), ("map", "tag")),
    "step2": Phase("step2", ("subnet2",), ("img",)),
    "step3": Phase("step3", ALL, ("map", "img", "tag")),
    "mstep": Phase("mstep", ALL, ("map", "img", "tag")),
    # Not in the paper (a departure of the presets, whose M-step has loss_img = 0): subnet-2,
    # untouched by such an M-step, is refitted alone to the new model's labelmaps, as step 2 of
    # pretraining does, or inference would reconstruct through a stale decoder.
    "refit": Phase("refit", ("subnet2",), ("img",), unit_weights=True),
}


# ----------------------------------------------------------------------------- data order
@dataclass
class Source:
    dataset: Dataset
    per_batch: int  # images of the global batch drawn from this source


class PlannedBatches(Sampler[list[tuple[int, int, int]]]):
    """Yields, for iterations [start, stop), this rank's share of each global batch as
    (source, index, sample_seed) triples."""

    def __init__(self, sizes: Sequence[int], per_batch: Sequence[int], seed: int, start: int,
                 stop: int, dist: DistInfo = DistInfo()):
        self.sizes, self.per_batch, self.seed = list(sizes), list(per_batch), seed
        self.start, self.stop, self.dist = start, stop, dist
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _index(self, source: int, position: int) -> int:
        n = self.sizes[source]
        epoch, offset = divmod(position, n)
        key = (source, epoch)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + source * 7919 + epoch)
            self._perm_cache = {key: torch.randperm(n, generator=g)}
        return int(self._perm_cache[key][offset])

    def batch(self, iteration: int) -> list[tuple[int, int, int]]:
        items = []
        for source, count in enumerate(self.per_batch):
            for j in range(count):
                position = iteration * count + j
                sample_seed = (self.seed * 1_000_003 + source * 7919 + position) % (2**63)
                items.append((source, self._index(source, position), sample_seed))
        # Dealt out round-robin, so that every rank's share mixes the sources in the global
        # batch's proportion: a contiguous slice gave one rank only pixel-labelled images and
        # another only pseudo-labelled ones, and their BatchNorm statistics drifted apart. The
        # deal starts one rank later every iteration, so that odd remainders even out.
        world = self.dist.world_size
        share = len(items) // world
        return items[(self.dist.rank + iteration) % world::world][:share]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return self.stop - self.start


class SeededSources(Dataset):
    """Item (source, index, seed): the source's item with its random transform seeded."""

    def __init__(self, sources: Sequence[Dataset]):
        self.sources = list(sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        source, index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            item = self.sources[source][index]
            random.setstate(state)
        item["source"] = source
        return item


# ----------------------------------------------------------------------------- optimisation
def param_groups(model: DISNet, phase: Phase, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Pretrained backbone layers at lr, new layers (image branch, subnets) at head_lr_mult*lr."""
    backbone, head = [], []
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        param.requires_grad_(top in phase.trainable)
        if not param.requires_grad:
            continue
        is_new = top != "backbone" or name.startswith("backbone.image_branch")
        (head if is_new else backbone).append(param)
    groups = []
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr, "base_lr": cfg.lr})
    if head:
        lr = cfg.lr * cfg.head_lr_mult
        groups.append({"params": head, "lr": lr, "base_lr": lr})
    return groups


def poly(total: int, power: float, warmup: int = 0):  # noqa: ANN201 - a LambdaLR factor
    """Poly decay to 0 over ``total`` iterations, after a linear warm-up of ``warmup``."""
    def factor(it: int) -> float:
        ramp = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        return ramp * (1.0 - min(it, total) / max(total, 1)) ** power
    return factor


def set_train_modes(model: DISNet, phase: Phase, freeze_bn: bool) -> None:
    model.train()
    for name in ALL:
        if name not in phase.trainable:
            getattr(model, name).eval()  # frozen parts: no BatchNorm statistics updates
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def compute_losses(model: nn.Module, batch: dict[str, Any], phase: Phase, cfg: TrainConfig,
                   device: torch.device) -> dict[str, torch.Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    out = model(images)
    losses: dict[str, torch.Tensor] = {}
    if "map" in phase.losses:
        labelmap = batch["labelmap"].to(device, non_blocking=True)
        weight = batch.get("pixel_weight")
        per_image = map_loss(out["u3"].float(), labelmap,
                             None if weight is None else weight.to(device))
        losses["map"] = per_image.mean()
    if "img" in phase.losses:
        target = recon_target(images, out["z3"].shape[-2:])
        losses["img"] = recon_loss(out["z3"].float(), target.float()).mean()
    if "tag" in phase.losses:
        losses["tag"] = tag_loss(out["v3"].float(), batch["tags"].to(device)).mean()
    weights = ({k: 1.0 for k in losses} if phase.unit_weights
               else {"map": cfg.loss_map, "img": cfg.loss_img, "tag": cfg.loss_tag})
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def validate(model: DISNet, cfg: TrainConfig, device: torch.device) -> float:
    """mIoU (t = 0) of the model on ``cfg.val``; the RNG state is left as it was, so a run with
    validation trains exactly as one without."""
    from discli.data.manifest import read_manifest
    from discli.evaluation.evaluate import evaluate

    manifest = read_manifest(cfg.val, root=cfg.root or None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        report = evaluate(unwrap(model), manifest, steps=[0], ensemble=False, device=device)
    return float(report["setups"][0]["miou"])


# ----------------------------------------------------------------------------- state
def _cuda_index(device: torch.device | None) -> int | None:
    """The CUDA device whose generator a checkpoint holds: the one this process trains on
    (None: the current one when CUDA is available); None on CPU."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The generators a resumed run must continue: CPU, Python, and the CUDA generator of
    ``device`` alone (not every visible GPU's: a job resumed on a machine, or with a
    CUDA_VISIBLE_DEVICES, that shows fewer GPUs must still be able to restore it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s generators, the CUDA one onto ``device``. Older checkpoints
    hold a list (one state per GPU the writer saw): this device's entry is taken when there is
    one, else the CUDA generator stays as it is (a resume then differs only in CUDA-side
    randomness, rather than failing)."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    index = _cuda_index(device)
    saved = state.get("cuda")
    if index is None or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, index)


def unwrap(model: nn.Module) -> DISNet:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


@dataclass
class PhaseRun:
    """Where a phase's checkpoints and log go, and what else to store in its checkpoints."""

    checkpoint: Path
    log: Path
    stage: str
    extra: dict[str, Any]
    classes: list[str]
    mirror: TensorBoardMirror | None = None  # log records also go to TensorBoard


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


def run_phase(model: DISNet, phase: Phase, sources: Sequence[Source], cfg: TrainConfig,
              total_iters: int, run: PhaseRun, device: torch.device,
              resume: dict[str, Any] | None = None, dist: DistInfo = DistInfo(),
              reporter: Reporter | None = None, lr_scale: float = 1.0, warmup: int = 0
              ) -> dict[str, Any]:
    """Train ``total_iters`` iterations of one phase (continuing ``resume`` if given); returns
    the final checkpoint state (also written to ``run.checkpoint``). ``lr_scale`` multiplies
    every learning rate of the phase, which warms up linearly over ``warmup`` iterations."""
    reporter = reporter or NullReporter()
    groups = param_groups(model, phase, cfg)
    for group in groups:
        group["lr"] = group["base_lr"] = group["lr"] * lr_scale
    net: nn.Module = model
    if dist.enabled and cfg.sync_bn and device.type == "cuda":
        # BatchNorm statistics of the global batch rather than of each rank's few images (in
        # place: the checkpoint keeps the same keys; in eval mode SyncBatchNorm is BatchNorm)
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr * lr_scale,
                                                             weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr * lr_scale, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly(total_iters, cfg.poly_power,
                                                                     warmup))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"], device)
        start = int(resume["iteration"])
        # one line through the reporter (the CLI prints it on stderr): a re-run that silently
        # skipped work, or silently redid it, could not be told apart
        place = " ".join(f"{k} {v}" for k, v in run.extra.items() if k in ("step", "round"))
        if "step" not in run.extra:  # pretrain's phases are its steps; a round has phases
            place = f"{place} {phase.name}".strip()
        reporter.log(f"resuming {run.stage} {place} at iteration {start} of {total_iters} "
                     f"(from {run.checkpoint})")
    if dist.is_main:
        _trim_log(run.log, run, phase.name, start)

    def state(iteration: int, done: bool) -> dict[str, Any]:
        return {"model": unwrap(model).state_dict(),
                "model_config": unwrap(model).config.to_dict(), "classes": run.classes,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_amp else {}, "stage": run.stage,
                "phase": phase.name, "iteration": iteration, "total_iters": total_iters,
                "done": done, "rng": rng_state(device), "config": cfg.to_dict(),
                "inference": cfg.inference_settings(), **run.extra}

    sampler = PlannedBatches([len(s.dataset) for s in sources],  # type: ignore[arg-type]
                             [s.per_batch for s in sources], cfg.seed, start, total_iters, dist)
    from discli.data.dataset import collate

    loader = DataLoader(SeededSources([s.dataset for s in sources]), batch_sampler=sampler,
                        collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda",
                        persistent_workers=False)
    set_train_modes(model, phase, cfg.freeze_bn)
    reporter.start(f"{run.stage} {phase.name}", total_iters)
    reporter.advance(start)
    tic = time.perf_counter()
    finished = start  # the last iteration whose step is complete: a state safe to save
    stopped = False
    with DeferredInterrupts() as interrupts:
        for iteration, batch in enumerate(_fetch(loader, interrupts), start=start + 1):
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = compute_losses(net, batch, phase, cfg, device)
            values = {k: float(v.detach()) for k, v in losses.items()}
            check_finite(values, iteration, run, phase, cfg, dist)  # before any weight changes
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the AMP-scaled ones
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            lr = optimizer.param_groups[-1]["lr"]
            reporter.advance(1, loss=values["loss"], lr=lr)
            if dist.is_main and (iteration % cfg.log_every == 0 or iteration == total_iters):
                record = {"stage": run.stage, "phase": phase.name, "iter": iteration, "lr": lr,
                          "time": round(time.perf_counter() - tic, 3), **values, **run.extra}
                append(run.log, record, run.mirror)
            if cfg.val and (iteration == total_iters
                            or (cfg.val_every and iteration % cfg.val_every == 0)):
                val_miou = validate(model, cfg, device)
                set_train_modes(model, phase, cfg.freeze_bn)
                if dist.is_main:
                    append(run.log, {"stage": run.stage, "phase": phase.name, "iter": iteration,
                                     "val_miou": val_miou, **run.extra}, run.mirror)
                reporter.log(f"{run.stage} {phase.name} iteration {iteration}: validation mIoU "
                             f"{100 * val_miou:.1f}")
            if iteration < total_iters and iteration % cfg.ckpt_every == 0 and dist.is_main:
                save_checkpoint(run.checkpoint, state(iteration, done=False))
            finished = iteration
            if interrupts.stop(dist):
                stopped = True
                break
        if finished < total_iters:  # stopped early by SIGINT / SIGTERM: keep what is done
            kept = f"no iteration of {run.stage} {phase.name} had finished"
            if finished > 0:
                if finished > start and finished % cfg.ckpt_every and dist.is_main:
                    save_checkpoint(run.checkpoint, state(finished, done=False))
                kept = (f"kept {run.checkpoint} at {run.stage} {phase.name} iteration "
                        f"{finished} of {total_iters}")
            raise Interrupted(interrupts.signum, f"{kept}; rerun the same command to continue "
                                                 f"from there (files of finished steps and "
                                                 f"rounds are kept)")
    final = state(total_iters, done=True)
    if dist.is_main:
        save_checkpoint(run.checkpoint, final)
    if stopped:  # the signal came during the last iteration: the phase is whole, stop after it
        raise Interrupted(interrupts.signum, f"{run.stage} {phase.name} finished: kept "
                                             f"{run.checkpoint}; rerun the same command to "
                                             f"continue from there")
    return final
