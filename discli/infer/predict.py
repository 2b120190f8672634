"""`dis infer` as a library: collect inputs, batch by size, write labelmaps and probabilities.

Outputs for an image with id ``ID`` under ``out_dir`` (an id may contain "/": sub-folders):

    ID.png           class indices, 8-bit greyscale ('L'), at the image's own resolution
    ID_color.png     the same labelmap with the VOC palette ('P')
    ID_overlay.jpg   (overlay=True; ID_overlay.png with overlay_format="png") the image with
                     the labelmap's non-background pixels blended
                     with their class colour at ``opacity`` (background left as it is)

Final probabilities (stride 8) are upsampled bilinearly (align_corners=False) to the image size
before the argmax. Images are batched only with images of the *same size* (never padded), so an
image's prediction does not depend on its batch mates. Every file is written atomically (temp +
rename); an image whose requested outputs all exist *and were made from the same input file
with the same checkpoint and settings* is skipped (resume) unless ``overwrite``.
``out_dir/.dis-infer.json`` records the checkpoint and settings: resuming into a folder made with
other ones is refused. ``out_dir/.dis-infer.outputs.jsonl`` records what made each output, one
line per image appended once its files are written: ``{"id", "input": hash of the input file's
bytes, "made": hash of checkpoint and settings}``. An image whose record is missing or differs
(another image under the same id, say) is predicted again; a folder without ``.dis-infer.json``
that already holds a file of an output's name is refused (the file was not made by dis infer).

No output may be a file the run reads: an input image, a labelmap of an input manifest, the
manifest, the checkpoint (:func:`discli.storage.safety.refuse_overlap`, exit 2, whatever the flags).

``probs_path``: the HDF5 file of final probabilities (:mod:`discli.infer.probs`; crash-safe part
files merged when the run ends, :mod:`discli.storage.parts`).

Modules: inputs, what is written (:class:`~discli.infer.inputs.InferOutputs`) and output paths
:mod:`discli.infer.inputs`; the run record and the record of outputs
:mod:`discli.infer.provenance`; PNG writers :mod:`discli.infer.visual`; batching, normalisation,
autocast, inference, views and upsampling, and how a run goes
(:class:`~discli.infer.runtime.RunOptions`) :mod:`discli.infer.runtime`.

Only one process may write an output folder or probabilities file at a time: :func:`predict`
locks them (:mod:`discli.storage.lock`); a second one stops with exit code 5.

Under torchrun (same command line; :func:`discli.distributed.setup_distributed`) every rank
takes its own per-rank lock (:mod:`discli.storage.lock`), so the ranks of one job never refuse
each other while a second job still is refused. Rank 0 alone cleans torn temporary files, checks
and writes ``.dis-infer.json``, decides which images are already done, and plans the batches one
process would form (from the image headers, :func:`discli.infer.runtime.plan_batches`); it
broadcasts that plan and the ranks take batches round-robin (:func:`discli.distributed.shard`):
every image is computed exactly once, in the batch it would have had alone. Each rank writes its
own images' files and its own probability parts (``part-r<rank>-NNNNNN.h5`` beside rank 0's
``part-NNNNNN.h5``); after a barrier rank 0 merges all the parts into the one file. A failure
while locking or checking on any rank stops every rank (:func:`discli.distributed.together`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from discli.distributed import (DistInfo, barrier, gather_to_main, on_main, setup_distributed,
                                shard, together)
from discli.errors import UsageError
from discli.infer.loop import InferenceConfig
from discli.infer.inputs import (InferOutputs, InputImage, Plan, collect_inputs, input_hash,
                                 plan_outputs, refuse_overlaps)
from discli.storage.lock import lock_file, lock_folder
from discli.model.net import DISNet
from discli.infer.probs import ProbsWriter, probs_attrs
from discli.progress import NullReporter, Reporter
from discli.infer.provenance import (OutputRecords, check_run_info, refuse_foreign, settings_hash,
                                     write_run_info)
from discli.infer.runtime import (InferenceOverrides, RunOptions, Views, image_sizes, infer_views,
                                  normalize_batch, plan_batches, size_batches, synchronize)
from discli.storage import make_folder, remove_stale_temps
from discli.infer.visual import write_color_png, write_index_png, write_overlay


# an image to compute: its Plan (the input and its output paths), its RGB pixels, its file's hash
Loaded = tuple[InputImage, dict[str, Path], np.ndarray, str]


def infer_checkpoint(inputs: Sequence[str], checkpoint: str | Path, *,
                     t_ts: int | Sequence[int] | None = None,
                     given: InferenceOverrides = InferenceOverrides(),
                     outputs: InferOutputs = InferOutputs(),
                     run: RunOptions = RunOptions(device=None),
                     reporter: Reporter | None = None, stdin: TextIO | None = None
                     ) -> Iterator[dict[str, Any]]:
    """``dis infer`` as one call: joins the torchrun job if any (:func:`setup_distributed` on
    ``run.device``, resolved by :func:`discli.distributed.resolve_device`), collects the inputs
    on rank 0 (``-`` reads ``stdin``), loads the checkpoint and runs :func:`predict` with its
    inference settings (``t_ts`` and those of ``given``: the checkpoint's where None). The
    checkpoint is protected from being written.

    ``t_ts`` may list several iteration counts: each is a pass of its own (the backbone runs
    again: test-time inference starts from the forward pass's features) writing into
    ``out_dir/t<N>/``, and its summaries carry ``t_ts``; a probabilities file holds one t only.
    """
    from discli.infer.checkpoint import load_for_inference
    from discli.distributed import resolve_device

    t_ts = None if t_ts is None else [int(t_ts)] if isinstance(t_ts, int) else [
        int(t) for t in t_ts]
    several = t_ts is not None and len(t_ts) > 1
    if several and outputs.probs_path is not None:
        raise UsageError("a probabilities file holds one t_ts: give one value, or leave out "
                         "the probabilities file")
    if several and outputs.out_dir is None:
        raise UsageError("several t_ts values write one folder each: give an output folder")
    dev, _ = setup_distributed(resolve_device(run.device))
    images = on_main(lambda: collect_inputs(inputs, stdin, exclude=outputs.out_dir))  # rank 0
    loaded = load_for_inference(checkpoint, dev)
    protect = (*outputs.protect, (checkpoint, "checkpoint"))
    base = outputs.folder
    for t in t_ts or [int(loaded.inference["t_ts"])]:
        folder = base / f"t{t}" if several and base is not None else base
        for summary in predict(loaded.model, images, classes=loaded.classes,
                               cfg=given.config(loaded, t),
                               outputs=replace(outputs, out_dir=folder, protect=protect),
                               run=replace(run, device=dev),
                               checkpoint_hash=loaded.checkpoint_hash, reporter=reporter):
            yield {**summary, "t_ts": t} if several else summary


def predict(model: DISNet, inputs: Sequence[InputImage], *, classes: Sequence[str],
            cfg: InferenceConfig | None = None, outputs: InferOutputs = InferOutputs(),
            run: RunOptions = RunOptions(), checkpoint_hash: str = "",
            reporter: Reporter | None = None) -> Iterator[dict[str, Any]]:
    """Infer every input at t = ``cfg.steps`` and write its ``outputs``; yields one summary
    dict per image.

    Summary: ``id``, ``image`` (path), ``size`` [H, W], ``skipped`` (outputs already there),
    ``outputs`` {kind: path}, and for computed images ``classes`` {name: pixel fraction}
    (largest first), ``tags`` {name: probability} (background excluded), ``loss`` (final
    objective) and ``ms`` (inference time of the image's share of its batch).

    Under torchrun (see the module docstring) every rank must pass the same ``inputs`` (e.g.
    collected on rank 0 and shared with :func:`discli.distributed.on_main`). Rank 0 yields the
    summary of every image, the skipped ones first, then its own as they are computed, then
    those of the other ranks once all are done; the other ranks yield their own images' only.

    ``run.views``: multi-scale and flip testing (:mod:`discli.infer.runtime`).

    No output may be a file the run reads: the inputs, their manifests and labelmaps, and the
    files of ``outputs.protect`` (the checkpoint); refused with :class:`UsageError` before
    anything is written, whatever ``outputs.overwrite`` says.
    """
    cfg = cfg or InferenceConfig()
    reporter = reporter or NullReporter()
    device, info = setup_distributed(run.device)
    model = model.to(device).eval()
    run = replace(run, device=device, views=run.views.checked())
    settings = _made_with(classes, cfg, run.views, checkpoint_hash)
    plans = plan_outputs(inputs, outputs)
    refuse_overlaps(inputs, plans, outputs)
    out = outputs.folder
    if out is not None:
        refuse_foreign(out, plans)  # again under the lock; here before the lock file exists
    with contextlib.ExitStack() as locks:
        def take_locks() -> None:  # per-rank lock names: the ranks of one job share the folder
            if out is not None:
                make_folder(out)
                locks.enter_context(lock_folder(out))
            if outputs.probs_path is not None:
                locks.enter_context(lock_file(outputs.probs_path))

        together(take_locks)
        yield from _predict_locked(model, plans, cfg, settings, outputs, run, reporter, info)


def _made_with(classes: Sequence[str], cfg: InferenceConfig, views: Views,
               checkpoint_hash: str) -> dict[str, Any]:
    """The settings that made the outputs (the run record, hashed into the record of each
    output): checkpoint, t, inference settings, classes, and the views unless the single one
    (so that folders of the single view keep their hash)."""
    settings = {"checkpoint_hash": checkpoint_hash, "steps": int(cfg.steps),
                "inference": {"lr": cfg.lr, "momentum": cfg.momentum,
                              "proximity": cfg.proximity}, "classes": list(classes)}
    if views.record() != {"scales": [1.0], "flip": False}:
        settings["views"] = views.record()
    return settings


def _predict_locked(model: DISNet, plans: list[Plan], cfg: InferenceConfig,
                    settings: dict[str, Any], outputs: InferOutputs, run: RunOptions,
                    reporter: Reporter, info: DistInfo) -> Iterator[dict[str, Any]]:
    """:func:`predict` once the output folder and probabilities file are locked: rank 0
    checks the folder and decides what is done, every rank computes its share."""
    main = info.is_main
    out = outputs.folder
    # an overlay's look is part of what made it: another --opacity redoes the overlays
    overlay = any("overlay" in paths for _, paths in plans)
    made = settings_hash({**settings, "overlay_opacity": outputs.opacity if overlay else None})
    records = OutputRecords(out, made) if out is not None else None
    probs = together(lambda: _prepare(plans, settings, outputs, records, info))
    try:
        # Nobody writes before rank 0 has decided what is done: the plan comes after every
        # rank's ProbsWriter exists and before any of them writes.
        skipped, todo, planned = on_main(lambda: _plan(plans, outputs.overwrite, probs,
                                                       records, run.batch_size, info))
        batches, own_total = _own_batches(plans, todo, planned, run.batch_size, info)
        reporter.start("infer", total=(len(skipped) if main else 0) + own_total)
        if main:
            for i in skipped:
                item, paths = plans[i]
                reporter.advance(1)
                yield {"id": item.id, "image": str(item.path), "skipped": True,
                       "outputs": {k: str(p) for k, p in paths.items()}}
        own: list[dict[str, Any]] = []
        writer = _ImageWriter(outputs.opacity, records, probs)
        for summary in _predict_batches(model, batches, settings["classes"], cfg, run, writer,
                                        reporter):
            if not main:
                own.append(summary)  # for rank 0 to report
            yield summary
        if probs is not None:
            probs.close(commit=False)  # this rank's last part is complete
        barrier()  # every rank's parts are complete
        together(lambda: _finish(probs, out, outputs.overwrite, settings) if main else None)
        others = gather_to_main(own) if info.enabled else None
    finally:
        # Entries are complete one by one: keep what was done, even after an error or ^C,
        # so a re-run resumes from there (rank 0 merges the parts finished so far).
        if probs is not None:
            probs.close(commit=main)
    for rank_summaries in (others or [])[1:]:
        yield from rank_summaries


def _prepare(plans: list[Plan], settings: dict[str, Any], outputs: InferOutputs,
             records: OutputRecords | None, info: DistInfo) -> ProbsWriter | None:
    """Rank 0 checks the output folder (torn temporaries removed, foreign files and another
    run's settings refused, the record of outputs read); every rank opens its probabilities
    writer."""
    out = outputs.folder
    if out is not None and info.is_main:
        # image writes torn by a kill: only where this run writes (never a scan of a big tree)
        for folder in {out, *(p.parent for _, paths in plans for p in paths.values())}:
            remove_stale_temps(folder)
        refuse_foreign(out, plans)
        check_run_info(out, settings, outputs.overwrite)
        assert records is not None
        records.load()
    if outputs.probs_path is None:
        return None
    return ProbsWriter(outputs.probs_path,
                       probs_attrs(settings["classes"], settings["steps"],
                                   settings["checkpoint_hash"], settings["inference"]),
                       overwrite=outputs.overwrite, rank=info.rank)


def _plan(plans: list[Plan], overwrite: bool, probs: ProbsWriter | None,
          records: OutputRecords | None, batch_size: int, info: DistInfo
          ) -> tuple[list[int], list[int], list[list[int]] | None]:
    """(skipped, to do, batches of the to-do images when sharded), decided by rank 0."""
    skipped, todo = [], []
    for i, (item, paths) in enumerate(plans):
        # A 0-byte output is a file truncated outside dis (dis writes atomically): redo it.
        done = (bool(paths) or probs is not None) and not overwrite and all(
            p.is_file() and p.stat().st_size > 0 for p in paths.values()) and (
            probs is None or item.id in probs.done)
        if done:  # outputs of this id exist: were they made from this input, these settings?
            digest = input_hash(item.path)
            done = ((records is None or records.matches(item.id, digest))
                    and (probs is None or (bool(digest)
                                           and probs.inputs.get(item.id) == digest)))
        (skipped if done else todo).append(i)
    if not info.enabled:
        return skipped, todo, None
    sizes = image_sizes(plans[i][0].path for i in todo)
    return skipped, todo, [[todo[j] for j in batch]
                           for batch in plan_batches(sizes, batch_size)]


def _own_batches(plans: list[Plan], todo: list[int], planned: list[list[int]] | None,
                 batch_size: int, info: DistInfo) -> tuple[Iterable[list[Loaded]], int]:
    """This rank's batches of decoded images and their count of images: in one process the
    to-do images batched by size as they are decoded; under torchrun this rank's share of
    rank 0's plan."""
    if planned is None:
        batches = size_batches(_loaded([plans[i] for i in todo]), lambda x: x[2].shape,
                               batch_size)
        return batches, len(todo)
    mine = shard(planned, info)
    return ((list(_loaded([plans[i] for i in batch])) for batch in mine),
            sum(len(batch) for batch in mine))


def _finish(probs: ProbsWriter | None, out: Path | None, overwrite: bool,
            settings: dict[str, Any]) -> None:
    """Rank 0, once every image is done: merge the probabilities, mark the folder complete."""
    if probs is not None:
        probs.close()
    if out is not None and overwrite:
        write_run_info(out, settings)  # every output is now of these settings


def _loaded(todo: list[Plan]) -> Iterator[Loaded]:
    """(image, its output paths, decoded RGB, hash of its file) for each image to predict."""
    from discli.data.images import read_image

    for item, paths in todo:
        rgb = read_image(item.path)
        yield item, paths, rgb, input_hash(item.path)


@dataclass
class _ImageWriter:
    """Writes one computed image's files, its line in the record of outputs and its
    probabilities."""

    opacity: float
    records: OutputRecords | None
    probs: ProbsWriter | None

    def write(self, item: InputImage, paths: dict[str, Path], rgb: np.ndarray,
              labelmap: np.ndarray, probs: torch.Tensor, tag_probs: np.ndarray,
              digest: str) -> None:
        if "labelmap" in paths:
            write_index_png(paths["labelmap"], labelmap)
            write_color_png(paths["color"], labelmap)
        if "overlay" in paths:
            write_overlay(paths["overlay"], rgb, labelmap, self.opacity)
        if self.records is not None and paths:
            self.records.add(item.id, digest)  # after its files: a kill before it redoes them
        if self.probs is not None:
            self.probs.add(item.id, probs.cpu().numpy(), tag_probs, digest)


def _predict_batches(model: DISNet, batches: Iterable[list[Loaded]], classes: Sequence[str],
                     cfg: InferenceConfig, run: RunOptions, writer: _ImageWriter,
                     reporter: Reporter) -> Iterator[dict[str, Any]]:
    names = list(classes)
    t = cfg.steps
    for batch in batches:
        images = normalize_batch([rgb for _, _, rgb, _ in batch], run.device)
        start = time.perf_counter()
        result = infer_views(model, images, [t], cfg, run.views, run.amp)[t]
        labelmaps = result.probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
        synchronize(run.device)
        ms = 1000 * (time.perf_counter() - start) / len(batch)
        tag_probs = result.tag_probs.float().cpu().numpy()
        for i, (item, paths, rgb, digest) in enumerate(batch):
            writer.write(item, paths, rgb, labelmaps[i], result.probs[i], tag_probs[i], digest)
            reporter.advance(1)
            yield _summary(item, paths, labelmaps[i], names, tag_probs[i],
                           float(result.loss[i]), ms)


def _summary(item: InputImage, paths: dict[str, Path], labelmap: np.ndarray,
             names: list[str], tag_probs: np.ndarray, loss: float, ms: float
             ) -> dict[str, Any]:
    """A computed image's summary (see :func:`predict`)."""
    counts = np.bincount(labelmap.reshape(-1), minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    height, width = labelmap.shape[:2]
    return {"id": item.id, "image": str(item.path), "size": [int(height), int(width)],
            "skipped": False, "outputs": {k: str(p) for k, p in paths.items()},
            "classes": {names[k]: round(float(counts[k]) / labelmap.size, 4) for k in order
                        if counts[k] > 0},
            "tags": {names[k]: round(float(tag_probs[k]), 4) for k in range(1, len(names))},
            "loss": loss, "ms": round(ms, 2)}
