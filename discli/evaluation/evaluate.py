"""`dis evaluate` as a library: VOC-protocol scores of several inference setups in one pass.

For every image the backbone runs once; inference is snapshotted at each requested ``t_ts``
(:func:`discli.infer.loop.infer_steps`), and each snapshot is one *setup*. The *ensemble* setup
(section 4.2 of the paper: different inference iterations disagree usefully) averages the
upsampled final probabilities of all snapshots and takes the argmax.

Per setup the accumulators are a :class:`~discli.evaluation.metrics.ConfusionMatrix` and a
:class:`~discli.evaluation.metrics.BoundaryF` (rules in :mod:`discli.evaluation.metrics`): both
keep their state in one tensor, so a distributed run gives each rank a shard of the images and calls
:meth:`Evaluator.all_reduce` before :meth:`Evaluator.result`.

Timing: ``ms_per_image`` is the wall time of the forward, the inference up to the largest t, the
upsampling and the argmax, divided by the number of images (CUDA synchronised; data loading and
scoring not included). The first batch is left out when there are others (it carries one-time
costs). All setups come from that one pass, so it is the cost of the largest t (the t=0 setup
alone would cost less).

Under torchrun (:func:`discli.distributed.setup_distributed`; gloo on CPU, NCCL on CUDA) the
batches one process would form (:func:`discli.infer.runtime.shared_plan`, from the image headers)
are dealt round-robin to the ranks (:func:`discli.distributed.shard`): every image is scored exactly
once, in the very batch it would have had alone, so the summed confusion matrices and boundary
counts equal the single-process ones exactly. Every rank returns the summed report. Its
``ms_per_image`` is the rank-summed time over the rank-summed images (each rank's first batch
left out as above): what one image costs one process, comparable with a single-process figure;
the job's throughput is about world-size times higher.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from discli.infer.checkpoint import check_classes
from discli.distributed import DistInfo, setup_distributed
from discli.errors import BadInputError, UsageError
from discli.infer.loop import InferenceConfig
from discli.evaluation.metrics import BoundaryF, ConfusionMatrix
from discli.model.net import DISNet
from discli.infer.runtime import (InferenceOverrides, RunOptions, infer_views, shared_plan,
                                  size_batches, synchronize)
from discli.progress import NullReporter, Reporter
from discli.infer.visual import DEFAULT_OPACITY

ENSEMBLE = "ensemble"


def setup_names(steps: Sequence[int], ensemble: bool = True) -> list[str]:
    names = [f"t={t}" for t in steps]
    return names + [ENSEMBLE] if ensemble and len(steps) > 1 else names


class Evaluator:
    """Accumulates confusion matrices and boundary counts for every setup."""

    def __init__(self, num_classes: int, steps: Sequence[int], ensemble: bool = True,
                 boundary_tolerance: float = 2.0, device: str | torch.device = "cpu"):
        self.steps = list(steps)
        self.names = setup_names(self.steps, ensemble)
        self.device = torch.device(device)  # where the states live: cuda for an NCCL all_reduce
        self.confusion = {n: ConfusionMatrix(num_classes, device) for n in self.names}
        self.boundary = {n: BoundaryF(boundary_tolerance, device=device) for n in self.names}
        self.images = 0
        # timing: the first batch (one-time costs: allocator, kernel selection) is kept apart
        self.timed_images, self.seconds = 0, 0.0
        self.warmup_images, self.warmup_seconds = 0, 0.0

    def add_time(self, seconds: float, images: int) -> None:
        self.images += images
        if self.warmup_images == 0:
            self.warmup_images, self.warmup_seconds = images, seconds
        else:
            self.timed_images += images
            self.seconds += seconds

    @property
    def ms_per_image(self) -> float:
        if self.timed_images:
            return 1000 * self.seconds / self.timed_images
        return 1000 * self.warmup_seconds / self.warmup_images if self.warmup_images else math.nan

    def update(self, name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion[name].update(pred, target)
        for p, t in zip(pred, target):
            self.boundary[name].update(p, t)

    def all_reduce(self) -> Evaluator:
        from discli.distributed import all_reduce_sum

        for name in self.names:
            self.confusion[name].all_reduce()
            self.boundary[name].all_reduce()
        totals = all_reduce_sum(torch.tensor(
            [self.images, self.timed_images, self.seconds, self.warmup_images,
             self.warmup_seconds], dtype=torch.float64, device=self.device)).tolist()
        self.images, self.timed_images, self.warmup_images = (int(totals[i]) for i in (0, 1, 3))
        self.seconds, self.warmup_seconds = totals[2], totals[4]
        return self

    def result(self, classes: Sequence[str]) -> dict[str, Any]:
        ms = self.ms_per_image
        setups = []
        for name in self.names:
            scores = self.confusion[name].compute(classes)
            setups.append({"name": name,
                           "steps": self.steps if name == ENSEMBLE else int(name[2:]),
                           "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                           "boundary": self.boundary[name].compute(), "ms_per_image": ms,
                           "iou": scores["iou"], "classes_counted": scores["classes_counted"],
                           "pixels": scores["pixels"],
                           "confusion": self.confusion[name].mat.cpu().tolist()})
        return {"images": self.images, "ms_per_image": ms, "setups": setups}


def _finite(value: Any) -> Any:
    """NaN -> None throughout (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True)
class Scoring:
    """What an evaluation scores: a setup for every t of ``steps`` (None: t = 0; for
    :func:`evaluate_checkpoint` the checkpoint's t_ts) and, with ``ensemble`` and 2+ t, their
    average; boundary F at ``boundary_tolerance`` pixels; the labelled records of ``split``
    (None: all), the first ``limit`` of them."""

    steps: Sequence[int] | None = None
    ensemble: bool = True
    boundary_tolerance: float = 2.0
    split: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluation writes besides its report (:class:`PredictionSaver`): with a
    ``save_dir``, every setup's predictions (overlays as ``overlay_format`` at ``opacity``) and
    confusion.png; nothing without one."""

    save_dir: str | Path | None = None
    opacity: float = DEFAULT_OPACITY
    overlay_format: str = "jpg"


def _labelled(manifest: Any, scoring: Scoring) -> Any:
    """The records scored: those with a labelmap (of ``scoring.split``), the first
    ``scoring.limit`` of them."""
    records = [r for r in manifest.records
               if r.labelmap and (scoring.split is None or r.split == scoring.split)]
    if not records:
        where = f" in split {scoring.split!r}" if scoring.split else ""
        raise BadInputError(f"no records with a labelmap{where} to evaluate on", manifest.path)
    if scoring.limit is not None:
        records = records[:scoring.limit]
    return dataclasses.replace(manifest, records=records)


def evaluate(model: DISNet, manifest: Any, scoring: Scoring = Scoring(),
             cfg: InferenceConfig | None = None, *, classes: Sequence[str] | None = None,
             run: RunOptions = RunOptions(), outputs: EvalOutputs = EvalOutputs(),
             reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on the labelled records of ``manifest`` (a
    :class:`discli.data.manifest.Manifest`) at every t in ``scoring.steps`` (+ their
    ensemble). ``classes``: the model's class names (default: the manifest's).

    Returns ``{"manifest", "checkpoint" (None: :func:`evaluate_checkpoint` names it), "split",
    "classes", "steps", "images", "ms_per_image", "boundary_tolerance", "setups": [{"name",
    "steps", "miou", "pixel_acc", "boundary": {"precision", "recall", "f1", "tolerance"},
    "ms_per_image", "iou": {class: IoU or None}, "classes_counted", "pixels", "confusion": K x
    K pixel counts, rows = true class, columns = predicted}, ...]}``; mIoU over classes with
    gt + pred pixels > 0.

    ``outputs.save_dir``: also write what was scored (:class:`PredictionSaver`): per setup a
    folder (``t0``, ``t10``, ``ensemble``) with ``<id>.png``, the prediction as a VOC palette
    PNG, and ``<id>_overlay.jpg`` (``overlay_format`` "png": ``.png``), the image with the
    prediction blended over its labelled non-background pixels at ``opacity``; and
    ``confusion.png``, the confusion matrix of every setup.

    ``run.views``: multi-scale and flip testing (:mod:`discli.infer.runtime`): every t is the
    average of the probabilities of every scale, and of its mirror image when ``flip``.

    Under torchrun each rank scores its share of the batches and every rank returns the report
    of the whole set (see the module docstring).
    """
    from discli.data.dataset import SegDataset

    views = run.views.checked()
    cfg = cfg or InferenceConfig()
    reporter = reporter or NullReporter()
    device, info = setup_distributed(run.device)
    run = dataclasses.replace(run, device=device, views=views)
    steps = sorted(set(int(t) for t in (scoring.steps if scoring.steps is not None else (0,))))
    classes = list(classes) if classes is not None else list(manifest.classes)
    check_classes(classes, manifest.classes, "manifest", manifest.path)
    data = _labelled(manifest, scoring)
    dataset = SegDataset(data, transform=None, use_labelmaps=True)
    model = model.to(device).eval()
    acc = Evaluator(len(classes), steps, scoring.ensemble, scoring.boundary_tolerance)
    saver = (PredictionSaver(outputs.save_dir, data, acc.names, outputs.opacity,
                             outputs.overlay_format) if outputs.save_dir is not None else None)
    batches, total = _batches(dataset, data, run, info)
    reporter.start("evaluate", total=total)
    _score_all(model, batches, acc, cfg, run, saver, reporter)
    if info.enabled:
        acc.all_reduce()  # every rank, those with no image included
    if acc.images == 0:
        raise BadInputError("no image had a readable labelmap", manifest.path)
    report = _finite(acc.result(classes))
    if saver is not None and info.is_main:
        saver.write_confusion(report["setups"], classes)
    shown = str(manifest.path) if manifest.path is not None else "<stdin>"  # "-" read
    return {"manifest": shown, "checkpoint": None, "split": scoring.split, "classes": classes,
            "steps": steps, "boundary_tolerance": scoring.boundary_tolerance, **report}


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, *,
                        root: str | Path | None = None, scoring: Scoring = Scoring(),
                        given: InferenceOverrides = InferenceOverrides(),
                        run: RunOptions = RunOptions(device=None),
                        outputs: EvalOutputs = EvalOutputs(),
                        reporter: Reporter | None = None) -> dict[str, Any]:
    """``dis evaluate`` as one call: joins the torchrun job if any (``run.device`` resolved by
    :func:`discli.distributed.resolve_device`), reads the manifest (``root`` overrides its
    root), loads the checkpoint and runs :func:`evaluate` with its inference settings
    (``scoring.steps`` and those of ``given``: the checkpoint's where None). The report also
    names the checkpoint, its hash and the inference settings used."""
    from discli.infer.checkpoint import load_for_inference
    from discli.data.manifest import read_manifest
    from discli.distributed import resolve_device

    dev, _ = setup_distributed(resolve_device(run.device))
    data = read_manifest(manifest, root=root)
    loaded = load_for_inference(checkpoint, dev)
    steps = list(scoring.steps) if scoring.steps is not None else [loaded.inference["t_ts"]]
    cfg = given.config(loaded)
    run.views.checked()  # evaluate's own checks, in its order, here naming the checkpoint
    check_classes(loaded.classes, data.classes, "manifest", data.path, str(checkpoint))
    report = evaluate(loaded.model, data, dataclasses.replace(scoring, steps=steps), cfg,
                      classes=loaded.classes, run=dataclasses.replace(run, device=dev),
                      outputs=outputs, reporter=reporter)
    report["checkpoint"] = str(checkpoint)  # (the key keeps its place in the report)
    report["checkpoint_hash"] = loaded.checkpoint_hash
    report["inference"] = {"t_ts": steps, "lr": cfg.lr, "momentum": cfg.momentum,
                           "proximity": cfg.proximity, "method": cfg.method,
                           **run.views.record()}
    return report


def _batches(dataset: Any, data: Any, run: RunOptions, info: DistInfo) -> tuple[Any, int]:
    """This rank's batches of same-size labelled items, and its count of images: in one
    process those :func:`size_batches` forms as the loader decodes; under torchrun the ones a
    single process would form (planned by rank 0 from the image headers), dealt round-robin."""
    if not info.enabled:
        loader = DataLoader(dataset, batch_size=None, shuffle=False,
                            num_workers=run.num_workers)
        items = (item for item in loader if bool(item["has_labelmap"]))
        return (size_batches(items, lambda item: tuple(item["image"].shape), run.batch_size),
                len(dataset))
    mine = shared_plan(lambda: [data.image_path(rec) for rec in data.records], run.batch_size,
                       info)
    loader = DataLoader(dataset, batch_sampler=mine, collate_fn=list,
                        num_workers=run.num_workers)
    batches = ([item for item in batch if bool(item["has_labelmap"])] for batch in loader)
    return (batch for batch in batches if batch), sum(len(b) for b in mine)


def _score_all(model: DISNet, batches: Iterable[list[dict[str, Any]]], acc: Evaluator,
               cfg: InferenceConfig, run: RunOptions, saver: PredictionSaver | None,
               reporter: Reporter) -> None:
    """Score every batch (its predictions written by ``saver``), showing the latest mIoU."""
    for batch in batches:
        preds = _score_batch(model, batch, acc, cfg, run)
        if saver is not None:
            saver.write(batch, preds)
        latest = acc.confusion[acc.names[-1]].compute()
        reporter.advance(len(batch), mIoU=100 * latest["miou"])  # percent, as every table


def _score_batch(model: DISNet, batch: list[dict[str, Any]], acc: Evaluator,
                 cfg: InferenceConfig, run: RunOptions) -> dict[str, torch.Tensor]:
    """One backbone forward per view (scale, flip) for a batch of same-size images, scored for
    every setup; returns the predictions (B, H, W) by setup name."""
    images = torch.stack([torch.as_tensor(item["image"]) for item in batch]).to(run.device)
    target = torch.stack([torch.as_tensor(item["labelmap"]) for item in batch])
    start = time.perf_counter()
    results = infer_views(model, images, acc.steps, cfg, run.views, run.amp)
    full = {t: results[t].probs for t in acc.steps}
    preds = {f"t={t}": full[t].argmax(dim=1) for t in acc.steps}
    if ENSEMBLE in acc.names:
        preds[ENSEMBLE] = torch.stack(list(full.values())).mean(dim=0).argmax(dim=1)
    preds = {name: p.cpu() for name, p in preds.items()}
    synchronize(run.device)
    acc.add_time(time.perf_counter() - start, len(batch))
    for name, pred in preds.items():
        acc.update(name, pred, target)
    return preds


def setup_folder(name: str) -> str:
    """The folder of a setup's predictions: "t=10" -> "t10", "ensemble" -> "ensemble"."""
    return name.replace("=", "")


class PredictionSaver:
    """Writes the predictions an evaluation scores (:class:`EvalOutputs`), as
    mmsegmentation's ``--show-dir`` does: ``<dir>/<setup>/<id>.png`` (VOC palette PNG, the
    palette index is the class), ``<dir>/<setup>/<id>_overlay.jpg`` (or ``.png``, by
    ``overlay_format``) and ``<dir>/confusion.png``.
    Every file is written atomically; a folder that would put an output on an input image or
    labelmap of the manifest is refused before anything is written."""

    def __init__(self, folder: str | Path, manifest: Any, names: Sequence[str], opacity: float,
                 overlay_format: str = "jpg"):
        from discli.infer.visual import check_opacity, check_overlay_format

        self.folder = Path(folder)
        self.names = list(names)
        self.opacity = check_opacity(opacity)
        self.overlay_format = check_overlay_format(overlay_format)
        inputs = {p.resolve() for rec in manifest.records
                  for p in (manifest.image_path(rec), manifest.labelmap_path(rec)) if p}
        for rec in manifest.records:
            for name in self.names:
                for path in self.paths(name, rec.id):
                    if path.resolve() in inputs:
                        raise UsageError(f"{{opt:save_dir}} {self.folder} would write {path} "
                                         "over an input file: choose another folder")
        if (self.folder / "confusion.png").resolve() in inputs:
            raise UsageError(f"{{opt:save_dir}} {self.folder} would write confusion.png over an "
                             "input file: choose another folder")

    def paths(self, name: str, image_id: str) -> tuple[Path, Path]:
        sub = self.folder / setup_folder(name)
        return sub / f"{image_id}.png", sub / f"{image_id}_overlay.{self.overlay_format}"

    def write(self, batch: list[dict[str, Any]], preds: dict[str, torch.Tensor]) -> None:
        from discli.data.dataset import denormalize
        from discli.storage import atomic_write
        from discli.data.labelmap import write_palette_png
        from discli.infer.visual import overlay_bytes

        for i, item in enumerate(batch):
            rgb = (denormalize(torch.as_tensor(item["image"])).permute(1, 2, 0).numpy() * 255)
            rgb = rgb.round().astype("uint8")
            for name in self.names:
                labelmap = preds[name][i].numpy().astype("uint8")
                png, blend = self.paths(name, str(item["id"]))
                write_palette_png(png, labelmap)
                data = overlay_bytes(rgb, labelmap, self.opacity, self.overlay_format)
                atomic_write(blend, lambda f, data=data: f.write(data), durable=False)

    def write_confusion(self, setups: list[dict[str, Any]], classes: Sequence[str]) -> Path:
        from discli.evaluation.plots import write_confusions

        return write_confusions(self.folder / "confusion.png",
                                {s["name"]: s["confusion"] for s in setups}, classes)
