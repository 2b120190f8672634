"""Stage 2 (section 3.1): the dual loop on pixel-labelled + tagged images, in rounds.

Round ``r`` starts from the model of round ``r-1`` (round 1 from the pretrained ``final.pth``):

- E-step: that model, frozen, infers pseudo-labelmaps and cleaned tags for every tagged image
  (:func:`discli.train.estep.run_estep`) into ``round-r/cache.h5``, stamped with the hash of
  the model file that produced it.
- M-step (Eq. 1): all weights train on batches mixing pixel-labelled images (their labelmaps
  and tags) and tagged images at ``tagged_ratio``. A tagged image's ground truth is its cached
  pseudo-labelmap (pixels below ``confidence``, and those of classes that ``tag_gate``'s tags
  call absent, ignored) and, as tag target (``mstep_tags``), its caption tags T^w, its cleaned
  tags T̂^w (made by the run's :class:`discli.pseudo.tags.TagRule`) or both; the reconstruction loss
  joins with ``loss_img`` > 0 (the paper's; the ``demo`` preset has 0). Then, with
  ``subnet2_refit_iters``, subnet-2 alone is refitted on the reconstruction loss to the new
  model's labelmaps (``refit.pth`` while it runs; not in the paper); the result is
  ``round-r/model.pth``.

Everything a round has finished is a file, so the state of the loop is read off the folder:
``model.pth`` present = round done; ``cache.h5`` present = E-step done; ``last.pth`` = M-step in
progress; ``cache.parts/`` = E-step in progress. Each step can be run alone
(``only="estep"|"mstep"``, ``round_=N``), and re-running continues where it stopped, also after
a SIGKILL at any moment; other settings are refused (:mod:`discli.train.settings`), except more
``rounds``. ``<out>/finetune`` is locked while a run writes it (:mod:`discli.storage.lock`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from discli.pseudo.cache import PseudoCache
from discli.data.dataset import train_transform
from discli.storage import atomic_write
from discli.infer.checkpoint import file_hash, load_checkpoint, model_from_checkpoint
from discli.distributed import (barrier, check_batch_split, dist_info, resolve_device,
                                setup_distributed)
from discli.errors import BadInputError, CorruptError, UsageError, warn
from discli.storage.lock import lock_folder
from discli.storage import make_folder, remove_stale_temps, same_bytes
from discli.progress import NullReporter, Reporter
from discli.train.config import dump_toml
from discli.train.keys import TrainConfig
from discli.train.batches import Source
from discli.train.engine import PhaseRun, Schedule, run_phase
from discli.train.estep import Execution, PseudoLabelling, run_estep
from discli.train.phases import PHASES
from discli.train.pretrain import check_same_architecture, labelled_dataset, step_results
from discli.train.runlog import append, latest, open_mirror, read_log, require_tensorboard
from discli.train.settings import check_same_on_every_rank, check_same_run, held_settings

if TYPE_CHECKING:
    import torch

    from discli.data.dataset import SegDataset
    from discli.data.manifest import Manifest
    from discli.distributed import DistInfo
    from discli.train.runlog import TensorBoardMirror


def init_checkpoint(cfg: TrainConfig) -> Path:
    return Path(cfg.init) if cfg.init else Path(cfg.out) / "pretrain" / "final.pth"


def round_dir(cfg: TrainConfig, r: int) -> Path:
    return Path(cfg.out) / "finetune" / f"round-{r}"


def round_input(cfg: TrainConfig, r: int) -> Path:
    """The model file a round starts from."""
    return init_checkpoint(cfg) if r == 1 else round_dir(cfg, r - 1) / "model.pth"


def mstep_records(tagged: Any, cfg: TrainConfig) -> Any:
    """The tagged images the M-step trains on. With ``drop_untagged``, an image whose caption
    names no class is left out: its tag loss would push every class to absent and its
    pseudo-labelmap, suppressed by those tags, would teach it as all background."""
    if not cfg.drop_untagged:
        return tagged
    kept = [r for r in tagged.records if r.tags]
    if not kept:
        raise BadInputError("no tagged image has a tag (every caption names no class)",
                            cfg.tagged)
    return dataclasses.replace(tagged, records=kept)


def log_estep(log: Path, cache_path: Path, cfg: TrainConfig, r: int,
              mirror: Any = None, seconds: float | None = None) -> dict[str, Any]:
    """Append the statistics of a finished E-step's cache to the run's log.jsonl, with the
    E-step's ``seconds`` (its ``time``, as the M-step's records give theirs) when known."""
    from discli.pseudo.stats import cache_stats

    cache = PseudoCache(cache_path)
    try:
        stats = cache_stats(cache, cfg.confidence, cfg.tag_cleaning())
    finally:
        cache.close()
    record = {"stage": "finetune", "phase": "estep", "round": r, "t_tr": cfg.t_tr, **stats}
    if seconds is not None:
        record["time"] = round(seconds, 3)
    append(log, record, mirror)
    return record


def mstep_sources(labelled: Any, pseudo: Any, cfg: TrainConfig) -> list[Source]:
    """The M-step's two sources of every batch, ``tagged_ratio`` of it pseudo-labelled (a source
    with no share left out)."""
    n_tagged = round(cfg.batch_size * cfg.tagged_ratio)
    return [s for s in (Source(labelled, cfg.batch_size - n_tagged), Source(pseudo, n_tagged))
            if s.per_batch]


def round_status(cfg: TrainConfig, r: int) -> str:
    d = round_dir(cfg, r)
    if (d / "model.pth").exists():
        return "done"
    if (d / "last.pth").exists():
        return "mstep-running"
    if (d / "cache.h5").exists():
        return "estep-done"
    if (d / "cache.parts").exists():
        return "estep-running"
    return "todo"


@dataclass(frozen=True)
class DualLoop:
    """One fine-tuning run as each of its rounds sees it: the settings, the data, where it runs
    and where its output goes."""

    cfg: TrainConfig
    out: Path  # <out>/finetune
    tagged: Manifest
    labelled: SegDataset
    device: torch.device
    dist: DistInfo
    reporter: Reporter
    force: bool  # use caches made by another model file
    mirror: TensorBoardMirror | None = None  # the log also goes to TensorBoard


def finetune(cfg: TrainConfig, only: str | None = None, round_: int | None = None,
             reporter: Reporter | None = None, force: bool = False,
             tensorboard: bool = False) -> dict[str, Any]:
    """Run (or continue) the rounds; returns a summary: ``rounds`` (round -> "trained",
    "estep done" or "already done"), ``results`` (round -> its E-step statistics under
    ``estep`` and its M-step's last logged losses and validation mIoU, from ``log.jsonl``),
    ``checkpoint`` (``final.pth`` once the last round is done). ``tensorboard``: mirror the log
    to ``<out>/finetune/tensorboard/``."""
    from discli.data.manifest import read_manifest

    if not cfg.out:
        raise UsageError("no run folder given ({opt:out})")
    require_tensorboard(tensorboard)
    if only not in (None, "estep", "mstep"):
        raise UsageError(f"{{opt:only}} must be estep or mstep, got {only!r}")
    if round_ is not None and not 1 <= round_ <= cfg.rounds:
        raise UsageError(f"{{opt:round}} must be in 1..{cfg.rounds}, got {round_}")
    reporter = reporter or NullReporter()
    device = resolve_device(cfg.device)
    if only != "estep":  # the E-step shards whole batches and takes any number of processes
        check_batch_split(cfg.batch_size, dist_info().world_size)  # before joining the job
    device, dist = setup_distributed(device)
    check_same_on_every_rank(cfg, "finetune")
    if not cfg.tagged:
        raise UsageError("no tagged manifest given ({opt:tagged})")
    tagged = read_manifest(cfg.tagged, root=cfg.root or None)
    labelled_manifest, labelled = labelled_dataset(cfg)
    if tagged.classes != labelled_manifest.classes:
        raise BadInputError(f"classes {tagged.classes} differ from the labelled manifest's "
                            f"{labelled_manifest.classes}", cfg.tagged)
    out = Path(cfg.out) / "finetune"
    make_folder(out)
    with lock_folder(out):
        return _finetune(DualLoop(cfg, out, tagged, labelled, device, dist, reporter, force),
                         only, round_, tensorboard)


def _tidy_round(rdir: Path) -> None:
    """Remove what a kill between two steps of a finished piece of work left behind."""
    remove_stale_temps(rdir)
    if (rdir / "cache.h5").exists() and (rdir / "cache.parts").is_dir():
        shutil.rmtree(rdir / "cache.parts")  # killed after the merge, before removing its parts
    if (rdir / "model.pth").exists():  # killed after model.pth was written
        (rdir / "last.pth").unlink(missing_ok=True)
        (rdir / "refit.pth").unlink(missing_ok=True)


def _holds_work(out: Path) -> bool:
    """Whether the folder holds anything a round made (finished or not)."""
    return (out / "final.pth").exists() or any(
        d.is_dir() and any(d.iterdir()) for d in out.glob("round-*"))


def _todo(cfg: TrainConfig, r: int, only: str | None) -> bool:
    status = round_status(cfg, r)
    if only == "estep":
        return status in ("todo", "estep-running")
    return status != "done"


def _finetune(loop: DualLoop, only: str | None, round_: int | None, tensorboard: bool
              ) -> dict[str, Any]:
    cfg, out, dist = loop.cfg, loop.out, loop.dist
    if dist.is_main:
        remove_stale_temps(out)
    if _holds_work(out):  # continue the run the folder holds only with its own settings
        check_same_run(out, held_settings(out), cfg, "finetune")
    rounds = [round_] if round_ is not None else list(range(1, cfg.rounds + 1))
    final = round_dir(cfg, cfg.rounds) / "model.pth"
    todo = any(_todo(cfg, r, only) for r in rounds)
    if dist.is_main and todo:  # a run with nothing left to do rewrites nothing
        atomic_write(out / "config.toml", lambda f: f.write(dump_toml(cfg).encode()))
    mirror = open_mirror(out / "tensorboard", tensorboard and dist.is_main and todo)
    summary: dict[str, Any] = {"out": str(out), "rounds": {}, "results": {}}
    try:
        for r in rounds:
            summary["rounds"][r] = _round(dataclasses.replace(loop, mirror=mirror), r, only)
    finally:
        if mirror is not None:
            mirror.close()
    records = read_log(out / "log.jsonl")
    for r in rounds:
        result = step_results(records, "finetune", cfg.mstep_iters, phase="mstep", round=r)
        estep = {k: v for k, v in latest(records, phase="estep", round=r).items()
                 if k not in ("stage", "phase", "round")}
        summary["results"][r] = {**result, "estep": estep}
    if cfg.rounds and final.exists():
        if dist.is_main:
            _final_copy(final, out / "final.pth", cfg.rounds,
                        trained=summary["rounds"].get(cfg.rounds) == "trained")
        summary["checkpoint"] = str(out / "final.pth")
    return summary


def _final_copy(model: Path, copy: Path, rounds: int, trained: bool) -> None:
    """Write ``final.pth`` (a copy of the last round's ``model.pth``), or check it before it is
    reported again: a copy that differs is rebuilt from ``model.pth`` (verified, unless this
    run just wrote it), a corrupt ``model.pth`` from a ``final.pth`` that verifies."""
    if not trained:
        try:
            load_checkpoint(model)
        except CorruptError as exc:
            try:
                held = load_checkpoint(copy) if copy.exists() else None
            except CorruptError:
                held = None
            if held is None or held.get("round") != rounds:
                raise CorruptError(f"{exc.template}; delete it and {copy}, then rerun the same "
                                   f"command: round {rounds}'s M-step is redone from its cache",
                                   exc.path) from None
            warn(f"{exc}; rebuilt it from {copy}, which holds the same round")
            atomic_write(model, lambda f: f.write(copy.read_bytes()))
    if not same_bytes(copy, model):
        if copy.exists() and not trained and _held_round(copy) in (None, rounds):
            # a copy of an earlier last round (the run was given more rounds) is simply replaced
            warn(f"does not match {model}, of which it is a copy (truncated or corrupt); "
                 f"rebuilt it", copy)
        atomic_write(copy, lambda f: f.write(model.read_bytes()))


def _held_round(path: Path) -> int | None:
    """The round a final.pth holds; None when it does not load."""
    try:
        return load_checkpoint(path).get("round")
    except CorruptError:
        return None


def _round(loop: DualLoop, r: int, only: str | None) -> str:
    """Round ``r`` (or its step ``only``) from where it stands; returns what was done."""
    cfg, rdir = loop.cfg, round_dir(loop.cfg, r)
    if loop.dist.is_main:
        _tidy_round(rdir)
    barrier()
    if round_status(cfg, r) == "done":
        return "already done"
    source = round_input(cfg, r)
    if not source.exists():
        what = "pretrain has" if r == 1 else f"round {r - 1} has"
        raise UsageError(f"{source} not found: {what} not finished")
    source_hash = file_hash(source)
    cache_path = rdir / "cache.h5"
    if only in (None, "estep") and not cache_path.exists():
        _estep(loop, r, source, source_hash)
    if only == "estep":
        return "estep done"
    if not cache_path.exists():
        raise UsageError(f"{cache_path} not found: run the E-step of round {r} first")
    _mstep(loop, r, source, source_hash)
    return "trained"


def _estep(loop: DualLoop, r: int, source: Path, source_hash: str) -> None:
    """Round ``r``'s pseudo-labels by the model file ``source`` (its cache, logged)."""
    cfg, cache_path = loop.cfg, round_dir(loop.cfg, r) / "cache.h5"
    state = load_checkpoint(source)
    check_same_architecture(state, cfg, loop.tagged.classes, source)
    model = model_from_checkpoint(state, source).to(loop.device)
    labelling = PseudoLabelling(source_hash, cfg.t_tr, cfg.inference(), pseudo_map=cfg.pseudo_map,
                                ignore_suppressed=cfg.ignore_suppressed, flip=cfg.estep_flip)
    execution = Execution(batch_size=cfg.estep_batch_size, device=loop.device,
                          num_workers=cfg.num_workers, amp=cfg.amp,
                          part_images=cfg.estep_part_images)
    tic = time.perf_counter()
    run_estep(model, loop.tagged, cache_path, labelling, execution, reporter=loop.reporter,
              force=loop.force, dist=loop.dist)
    if loop.dist.is_main:
        log_estep(loop.out / "log.jsonl", cache_path, cfg, r, loop.mirror,
                  time.perf_counter() - tic)


def _mstep(loop: DualLoop, r: int, source: Path, source_hash: str) -> None:
    """Round ``r``'s M-step on its cache (then the subnet-2 refit), into ``model.pth``."""
    from discli.train.pseudo import PseudoLabelled

    cfg, rdir = loop.cfg, round_dir(loop.cfg, r)
    cache = PseudoCache(rdir / "cache.h5", checkpoint_hash=source_hash, force=loop.force)
    last = rdir / "last.pth"
    resume = load_checkpoint(last) if last.exists() else None
    # Each M-step trains from the previous round's model, or (mstep_from = "init", as ST++
    # retrains) from the fine-tuning's starting checkpoint, so that the errors of one
    # round's model are not carried into the next as weights, only as pseudo-labels.
    start = init_checkpoint(cfg) if cfg.mstep_from == "init" else source
    start_state = resume if resume is not None else load_checkpoint(start)
    check_same_architecture(start_state, cfg, loop.tagged.classes, last if resume else start)
    model = model_from_checkpoint(start_state, start).to(loop.device)
    transform = (train_transform(cfg.crop_size, (cfg.scale_min, cfg.scale_max), strong=True)
                 if cfg.strong_aug else loop.labelled.transform)
    pseudo = PseudoLabelled(mstep_records(loop.tagged, cfg), cache, transform, cfg)
    run = PhaseRun(checkpoint=last, log=loop.out / "log.jsonl", stage="finetune",
                   extra={"round": r, "source_hash": source_hash}, classes=loop.tagged.classes,
                   mirror=loop.mirror, resume=resume, reporter=loop.reporter)
    refit = rdir / "refit.pth"
    refit_state = load_checkpoint(refit) if refit.exists() else None  # M-step done
    if refit_state is None:
        run_phase(model, PHASES["mstep"], mstep_sources(loop.labelled, pseudo, cfg), cfg,
                  Schedule(cfg.mstep_iters, cfg.mstep_lr_mult, cfg.mstep_warmup), run,
                  loop.device, loop.dist)
    result = last
    if cfg.subnet2_refit_iters > 0:
        if refit_state is not None:
            model.load_state_dict(refit_state["model"])
        # subnet-2 learns to redraw whole images from their labelmaps: no pasted boxes
        run_phase(model, PHASES["refit"], mstep_sources(loop.labelled, pseudo.unmixed(), cfg),
                  cfg, Schedule(cfg.subnet2_refit_iters),
                  dataclasses.replace(run, checkpoint=refit, resume=refit_state), loop.device,
                  loop.dist)
        result = refit
    if loop.dist.is_main:
        atomic_write(rdir / "model.pth", lambda f: f.write(result.read_bytes()))
        last.unlink()
        refit.unlink(missing_ok=True)
    barrier()
