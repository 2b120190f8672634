"""Stage 1 (section 3, "Fully-supervised Stage"): pretrain on pixel-labelled images in 3 steps.

Files in ``<out>/pretrain/``: ``last.pth`` (rolling checkpoint: resume point), ``step1.pth``,
``step2.pth``, ``final.pth`` (after step 3, the input of finetune), ``config.toml`` (the
effective configuration) and ``log.jsonl`` (metrics; with ``tensorboard``, mirrored to
``tensorboard/``). Re-running the same command on the same folder continues where it stopped; a
finished step is never redone, and other settings are refused (:mod:`discli.train.settings`).
The folder is locked while a run writes it (:mod:`discli.storage.lock`): a second run on it stops
with exit code 5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from discli.storage import atomic_write
from discli.model.backbones import backbone_options
from discli.infer.checkpoint import load_checkpoint, model_from_checkpoint
from discli.errors import CorruptError, warn
from discli.storage import same_bytes
from discli.distributed import (barrier, check_batch_split, dist_info, resolve_device,
                                setup_distributed)
from discli.errors import BadInputError, IncompatibleError, UsageError
from discli.storage.lock import lock_folder
from discli.storage import make_folder, remove_stale_temps
from discli.model.net import DISNet, ModelConfig
from discli.progress import Reporter
from discli.train.config import dump_toml
from discli.train.keys import TrainConfig, config_keys
from discli.train.batches import Source
from discli.train.engine import PhaseRun, Schedule, run_phase
from discli.train.phases import PHASES
from discli.train.runlog import latest, open_mirror, read_log, require_tensorboard
from discli.train.settings import check_same_on_every_rank, check_same_run, held_settings

ARCH_KEYS = ("backbone", "num_classes", "backbone_kwargs")
# keys of the configuration a backbone factory may take (by name, see backbone_options)
MODEL_KEYS = tuple(k.name for k in config_keys()
                   if k.group == "model" and k.name not in ("backbone", "backbone_weights"))


def new_model(cfg: TrainConfig, classes: list[str]) -> DISNet:
    torch.manual_seed(cfg.seed)
    # the model keys of the configuration that the backbone takes (tiny/small: channels)
    kwargs = {name: getattr(cfg, name) for name in backbone_options(cfg.backbone)
              if name in MODEL_KEYS}
    return DISNet(ModelConfig(backbone=cfg.backbone, num_classes=len(classes),
                              backbone_weights=cfg.backbone_weights or None,
                              backbone_kwargs=kwargs))


def check_same_architecture(state: dict[str, Any], cfg: TrainConfig, classes: list[str],
                            path: Path) -> None:
    stored = state["model_config"]
    want = {"backbone": cfg.backbone, "num_classes": len(classes)}
    for key, value in want.items():
        if stored.get(key) != value:
            raise IncompatibleError(f"checkpoint has {key}={stored.get(key)!r} but this run asks "
                                    f"for {value!r} (use another {{opt:out}}, or the same options)",
                                    path)
    if state.get("classes") and list(state["classes"]) != list(classes):
        raise IncompatibleError(f"checkpoint classes {state['classes']} differ from the "
                                f"manifest's {classes}", path)


def labelled_dataset(cfg: TrainConfig):  # noqa: ANN201
    from discli.data.dataset import SegDataset, train_transform
    from discli.data.manifest import read_manifest

    if not cfg.labelled:
        raise UsageError("no pixel-labelled manifest given ({opt:labelled})")
    manifest = read_manifest(cfg.labelled, root=cfg.root or None)
    manifest.records = [r for r in manifest.records if r.labelmap]
    if not manifest.records:
        raise BadInputError("no record with a labelmap (nothing to train on)", cfg.labelled)
    if cfg.val:  # refused now, not at the first validation after minutes of training
        val_classes = read_manifest(cfg.val, root=cfg.root or None).classes
        if val_classes != manifest.classes:
            raise BadInputError(f"classes {val_classes} differ from the labelled manifest's "
                                f"{manifest.classes}", cfg.val)
    transform = train_transform(cfg.crop_size, scale=(cfg.scale_min, cfg.scale_max))
    return manifest, SegDataset(manifest, transform=transform)


def pretrain(cfg: TrainConfig, steps: Sequence[int] = (1, 2, 3),
             reporter: Reporter | None = None, tensorboard: bool = False) -> dict[str, Any]:
    """Run (or continue) the requested pretraining steps; returns a summary: ``steps`` (step ->
    "trained" or "already done"), ``results`` (step -> its iterations, last logged losses and
    validation mIoU, from ``log.jsonl``), ``checkpoint`` (``final.pth`` once step 3 is done).
    ``tensorboard``: mirror the log to ``<out>/pretrain/tensorboard/``."""
    if any(s not in (1, 2, 3) for s in steps):
        raise UsageError(f"{{opt:steps/step}} must be 1, 2 or 3, got {list(steps)}")
    if not cfg.out:
        raise UsageError("no run folder given ({opt:out})")
    require_tensorboard(tensorboard)
    device = resolve_device(cfg.device)
    check_batch_split(cfg.batch_size, dist_info().world_size)  # before joining the job
    device, dist = setup_distributed(device)
    check_same_on_every_rank(cfg, "pretrain")
    out = Path(cfg.out) / "pretrain"
    make_folder(out)
    with lock_folder(out):
        return _pretrain(cfg, steps, reporter, out, device, dist, tensorboard)


def _recover(out: Path, exc: CorruptError, dist: Any) -> dict[str, Any]:
    """``last.pth`` is corrupt: continue from the last finished step whose file reads back
    (the steps after it are redone), or say what to delete."""
    for step in (3, 2, 1):
        path = step_file(out, step)
        try:
            state = load_checkpoint(path) if path.exists() else None
        except CorruptError:
            continue
        if state is None:
            continue
        if dist.is_main:
            warn(f"{exc}; continuing from {path.name} (step {step} finished; what followed it "
                 f"is redone)")
            atomic_write(out / "last.pth", lambda f: f.write(path.read_bytes()))
        return state
    raise CorruptError(f"{exc.template}; no finished step file reads back either: delete it to "
                       f"start this run afresh", exc.path)


def step_file(out: Path, step: int) -> Path:
    return out / ("final.pth" if step == 3 else f"step{step}.pth")


def _done_step(state: dict[str, Any] | None) -> int:
    """The last step a checkpoint state has finished (0: none)."""
    return 0 if state is None else int(state["step"]) - (0 if state["done"] else 1)


def _held_state(out: Path, dist: Any) -> dict[str, Any] | None:
    """The state of ``last.pth`` (None: no run yet), or of the last finished step that reads
    back when it is corrupt (:func:`_recover`)."""
    last = out / "last.pth"
    try:
        return load_checkpoint(last) if last.exists() else None
    except CorruptError as exc:
        return _recover(out, exc, dist)


def _start_model(state: dict[str, Any] | None, cfg: TrainConfig, classes: list[str], out: Path,
                 dist: Any) -> DISNet:
    """The model of the held ``state`` (its finished step's file made again if it is missing
    or damaged), or a new one."""
    if state is None:
        return new_model(cfg, classes)
    last = out / "last.pth"
    check_same_architecture(state, cfg, classes, last)
    model = model_from_checkpoint(state, last)
    finished = step_file(out, int(state["step"]))
    if state["done"] and dist.is_main and not same_bytes(finished, last):
        # killed between the step's last checkpoint and its copy (no copy), or the copy was
        # damaged since (truncated, a flipped bit): last.pth, verified as it was loaded,
        # holds the same state, so the copy is made again rather than reported broken
        if finished.exists():
            warn(f"does not match {last.name}, of which it is a copy (truncated or "
                 f"corrupt); rebuilt it from {last.name}", finished)
        atomic_write(finished, lambda f: f.write(last.read_bytes()))
    return model


def _todo_steps(steps: Sequence[int], state: dict[str, Any] | None, out: Path) -> list[int]:
    """The requested steps not finished yet; refused (before any work) unless they follow the
    finished ones."""
    todo = [step for step in sorted(set(steps)) if _done_step(state) < step]
    for step, expected in zip(todo, range(_done_step(state) + 1, 4)):
        if step != expected:  # steps run in order: refuse before any work
            raise UsageError(f"pretrain step {step - 1} has not finished in {out} "
                             f"(run {{opt:step={step - 1}}} first)")
    return todo


def _pretrain(cfg: TrainConfig, steps: Sequence[int], reporter: Reporter | None, out: Path,
              device: torch.device, dist: Any, tensorboard: bool) -> dict[str, Any]:
    if dist.is_main:
        remove_stale_temps(out)  # checkpoint writes torn by a kill
    state = _held_state(out, dist)
    if state is not None:  # the folder holds a run: continue it only with its own settings
        check_same_run(out, held_settings(out, state), cfg, "pretrain")
    manifest, dataset = labelled_dataset(cfg)
    model = _start_model(state, cfg, manifest.classes, out, dist)
    model.to(device)
    todo = _todo_steps(steps, state, out)
    if todo and dist.is_main:  # a run with nothing left to do rewrites nothing
        atomic_write(out / "config.toml", lambda f: f.write(dump_toml(cfg).encode()))
    run = PhaseRun(checkpoint=out / "last.pth", log=out / "log.jsonl", stage="pretrain",
                   extra={}, classes=manifest.classes, reporter=reporter,
                   mirror=open_mirror(out / "tensorboard", tensorboard and dist.is_main))
    iters = {1: cfg.iters_step1, 2: cfg.iters_step2, 3: cfg.iters_step3}
    summary: dict[str, Any] = {"out": str(out), "steps": {}, "results": {}}
    try:
        for step in sorted(set(steps)):
            if step not in todo:
                summary["steps"][step] = "already done"
                continue
            resume = state if state is not None and int(state["step"]) == step else None
            state = run_phase(model, PHASES[f"step{step}"], [Source(dataset, cfg.batch_size)],
                              cfg, Schedule(iters[step], warmup=cfg.warmup_iters),
                              dataclasses.replace(run, extra={"step": step}, resume=resume),
                              device, dist)
            if dist.is_main:
                atomic_write(step_file(out, step), lambda f: f.write(run.checkpoint.read_bytes()))
            barrier()
            summary["steps"][step] = "trained"
    finally:
        if run.mirror is not None:
            run.mirror.close()
    records = read_log(out / "log.jsonl")
    for step in sorted(set(steps)):
        summary["results"][step] = step_results(records, "pretrain", iters[step], step=step)
    if (out / "final.pth").exists():
        summary["checkpoint"] = str(out / "final.pth")
    return summary


def step_results(records: list[dict[str, Any]], stage: str, iterations: int, **match: Any
                 ) -> dict[str, Any]:
    """A finished phase's iterations and its last logged losses and validation mIoU."""
    values = latest(records, stage=stage, **match)
    keys = ("loss", "map", "img", "tag", "val_miou")
    return {"iterations": iterations, **{k: values[k] for k in keys if k in values}}
