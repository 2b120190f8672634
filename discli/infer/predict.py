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

Modules: inputs and output paths :mod:`discli.infer.inputs`; the run record and the record of
outputs :mod:`discli.infer.provenance`; PNG writers :mod:`discli.infer.visual`; batching,
normalisation, autocast, inference, views and upsampling :mod:`discli.infer.runtime`.

Only one process may write an output folder or probabilities file at a time: :func:`predict`
locks them (:mod:`discli.storage.lock`); a second one stops with exit code 5.

Under torchrun (same command line; :func:`discli.distributed.setup_distributed`) every rank
takes its own per-rank lock (:mod:`discli.storage.lock`), so the ranks of one job never refuse each
other while a second job still is refused. Rank 0 alone cleans torn temporary files, checks and
writes ``.dis-infer.json``, decides which images are already done, and plans the batches one process
would form (from the image headers, :func:`discli.infer.runtime.plan_batches`); it broadcasts that
plan and the ranks take batches round-robin (:func:`discli.distributed.shard`): every image is
computed exactly once, in the batch it would have had alone. Each rank writes its own images'
files and its own probability parts (``part-r<rank>-NNNNNN.h5`` beside rank 0's
``part-NNNNNN.h5``); after a barrier rank 0 merges all the parts into the one file. A failure while locking or checking on any
rank stops every rank (:func:`discli.distributed.together`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from discli.distributed import (DistInfo, barrier, gather_to_main, on_main, setup_distributed,
                                shard, together)
from discli.errors import BadInputError, UsageError
from discli.infer.loop import InferenceConfig
from discli.infer.inputs import InputImage, collect_inputs, input_hash, output_paths
from discli.storage.lock import lock_file, lock_folder
from discli.model.net import DISNet
from discli.infer.probs import ProbsWriter, probs_attrs
from discli.progress import NullReporter, Reporter
from discli.infer.provenance import (OUTPUT_RECORDS, RUN_INFO, OutputRecords, check_run_info,
                                     refuse_foreign, settings_hash, write_run_info)
from discli.infer.runtime import (check_scales, image_sizes, infer_views, normalize_batch,
                                  plan_batches, size_batches, synchronize)
from discli.storage.safety import refuse_overlap
from discli.storage import make_folder, remove_stale_temps
from discli.infer.visual import (check_overlay_format, write_color_png, write_index_png,
                                 write_overlay)


def infer_checkpoint(inputs: Sequence[str], checkpoint: str | Path, *,
                     out_dir: str | Path | None = None,
                     t_ts: int | Sequence[int] | None = None,
                     lr: float | None = None, momentum: float | None = None,
                     device: str | torch.device | None = None, stdin: TextIO | None = None,
                     **options: Any) -> Iterator[dict[str, Any]]:
    """``dis infer`` as one call: joins the torchrun job if any (:func:`setup_distributed` on
    ``device``, resolved by :func:`discli.distributed.resolve_device`), collects the inputs on
    rank 0 (``-`` reads ``stdin``), loads the checkpoint and runs :func:`predict` with its
    inference settings (``t_ts``, ``lr``, ``momentum``: the checkpoint's where None). The other
    ``options`` are those of :func:`predict`; the checkpoint is protected from being written.

    ``t_ts`` may list several iteration counts: each is a pass of its own (the backbone runs
    again: test-time inference starts from the forward pass's features) writing into
    ``out_dir/t<N>/``, and its summaries carry ``t_ts``; a probabilities file holds one t only.
    """
    from discli.infer.checkpoint import load_for_inference
    from discli.distributed import resolve_device

    wanted = None if t_ts is None else [int(t_ts)] if isinstance(t_ts, int) else \
        [int(t) for t in t_ts]
    several = wanted is not None and len(wanted) > 1
    if several and options.get("probs_path") is not None:
        raise UsageError("a probabilities file holds one t_ts: give one value, or leave out "
                         "the probabilities file")
    if several and out_dir is None:
        raise UsageError("several t_ts values write one folder each: give an output folder")
    dev, _ = setup_distributed(resolve_device(device))
    images = on_main(lambda: collect_inputs(inputs, stdin, exclude=out_dir))  # rank 0 reads stdin
    loaded = load_for_inference(checkpoint, dev)
    for steps in wanted or [int(loaded.inference["t_ts"])]:
        cfg = loaded.inference_config(steps, lr=lr, momentum=momentum)
        folder = Path(out_dir) / f"t{steps}" if several and out_dir is not None else out_dir
        for summary in predict(loaded.model, images, classes=loaded.classes, out_dir=folder,
                               steps=steps, cfg=cfg, device=dev,
                               checkpoint_hash=loaded.checkpoint_hash,
                               protect=[(checkpoint, "checkpoint")], **options):
            yield {**summary, "t_ts": steps} if several else summary


def predict(model: DISNet, inputs: Sequence[InputImage], *, classes: Sequence[str],
            out_dir: str | Path | None = None, steps: int = 0, cfg: InferenceConfig | None = None,
            batch_size: int = 8, device: str | torch.device = "cpu", amp: bool = False,
            overlay: bool = False, probs_path: str | Path | None = None, overwrite: bool = False,
            checkpoint_hash: str = "", reporter: Reporter | None = None, opacity: float = 0.5,
            protect: Iterable[tuple[str | Path, str]] = (), scales: Sequence[float] = (1.0,),
            flip: bool = False, overlay_format: str = "jpg") -> Iterator[dict[str, Any]]:
    """Infer every input and write its outputs; yields one summary dict per image.

    Summary: ``id``, ``image`` (path), ``size`` [H, W], ``skipped`` (outputs already there),
    ``outputs`` {kind: path}, and for computed images ``classes`` {name: pixel fraction}
    (largest first), ``tags`` {name: probability} (background excluded), ``loss`` (final
    objective) and ``ms`` (inference time of the image's share of its batch).

    Under torchrun (see the module docstring) every rank must pass the same ``inputs`` (e.g.
    collected on rank 0 and shared with :func:`discli.distributed.on_main`). Rank 0 yields the
    summary of every image, the skipped ones first, then its own as they are computed, then
    those of the other ranks once all are done; the other ranks yield their own images' only.

    ``scales`` / ``flip``: multi-scale and flip testing (:mod:`discli.infer.runtime`).

    No output may be a file the run reads: the inputs, their manifests and labelmaps, and the
    files of ``protect`` (``(path, what)`` pairs: the checkpoint); refused with
    :class:`UsageError` before anything is written, whatever ``overwrite`` says.
    """
    cfg = cfg or InferenceConfig()
    reporter = reporter or NullReporter()
    device, info = setup_distributed(device)
    model = model.to(device).eval()
    out = Path(out_dir) if out_dir is not None else None
    settings = {"checkpoint_hash": checkpoint_hash, "steps": int(steps),
                "inference": {"lr": cfg.lr, "momentum": cfg.momentum,
                              "proximity": cfg.proximity}, "classes": list(classes)}
    try:
        views = {"scales": list(check_scales(scales)), "flip": bool(flip)}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if views != {"scales": [1.0], "flip": False}:  # (folders of the single view keep their hash)
        settings["views"] = views
    plans = [(item, output_paths(out, item.id, overlay) if out is not None else {})
             for item in inputs]
    if check_overlay_format(overlay_format) != "jpg":  # write_overlay goes by the suffix
        for _, paths in plans:
            if "overlay" in paths:
                paths["overlay"] = paths["overlay"].with_suffix(f".{overlay_format}")
    targets = [p for _, paths in plans for p in paths.values()]
    if len(set(targets)) != len(targets):
        raise BadInputError("two images would write the same output file (an id ending in "
                            "'_color' or '_overlay' next to its stem?)", out)
    manifests = {item.source for item in inputs if item.source is not None}
    refuse_overlap(
        [(p, "output file") for p in targets] + [(probs_path, "{opt:probs} file")]
        + ([(out / RUN_INFO, "run record"), (out / OUTPUT_RECORDS, "record of outputs")]
           if out is not None else []),
        [(item.path, "input image") for item in inputs]
        + [(item.labelmap, "labelmap of the input manifest") for item in inputs]
        + [(m, "input manifest") for m in manifests] + list(protect),
        advice="choose another {opt:out} or {opt:probs}")
    if out is not None:
        refuse_foreign(out, plans)  # again under the lock; here before the lock file exists
    with contextlib.ExitStack() as locks:
        def take_locks() -> None:  # per-rank lock names: the ranks of one job share the folder
            if out is not None:
                make_folder(out)
                locks.enter_context(lock_folder(out))
            if probs_path is not None:
                locks.enter_context(lock_file(probs_path))

        together(take_locks)
        yield from _predict_locked(model, plans, classes, out, steps, cfg, batch_size, device,
                                   amp, probs_path, overwrite, checkpoint_hash, settings,
                                   reporter, info, opacity)


def _predict_locked(model: DISNet, plans: list[tuple[InputImage, dict[str, Path]]],
                    classes: Sequence[str], out: Path | None, steps: int, cfg: InferenceConfig,
                    batch_size: int, device: torch.device, amp: bool,
                    probs_path: str | Path | None, overwrite: bool, checkpoint_hash: str,
                    settings: dict[str, Any], reporter: Reporter, info: DistInfo,
                    opacity: float = 0.5) -> Iterator[dict[str, Any]]:
    main = info.is_main
    views = settings.get("views", {"scales": [1.0], "flip": False})

    # an overlay's look is part of what made it: another --opacity redoes the overlays
    overlay = any("overlay" in paths for _, paths in plans)
    made = settings_hash({**settings, "overlay_opacity": opacity if overlay else None})
    records = OutputRecords(out, made) if out is not None else None

    def prepare() -> ProbsWriter | None:
        if out is not None and main:
            # image writes torn by a kill: only where this run writes (never a scan of a big tree)
            for folder in {out, *(p.parent for _, paths in plans for p in paths.values())}:
                remove_stale_temps(folder)
            refuse_foreign(out, plans)
            check_run_info(out, settings, overwrite)
            assert records is not None
            records.load()
        if probs_path is None:
            return None
        return ProbsWriter(probs_path, probs_attrs(classes, steps, checkpoint_hash,
                                                   settings["inference"]),
                           overwrite=overwrite, rank=info.rank)

    probs = together(prepare)

    def plan() -> tuple[list[int], list[int], list[list[int]] | None]:
        """(skipped, to do, batches of the to-do images when sharded), decided by rank 0."""
        skipped, todo = [], []
        for i, (item, paths) in enumerate(plans):
            done = (bool(paths) or probs is not None) and not overwrite and all(
                p.is_file() for p in paths.values()) and (probs is None or item.id in probs.done)
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

    try:
        # Nobody writes before rank 0 has decided what is done: the plan comes after every
        # rank's ProbsWriter exists and before any of them writes.
        skipped, todo, planned = on_main(plan)
        if planned is None:
            mine = None
            batches = size_batches(_loaded([plans[i] for i in todo]), lambda x: x[2].shape,
                                   batch_size)
            own_total = len(todo)
        else:
            mine = shard(planned, info)
            batches = (list(_loaded([plans[i] for i in batch])) for batch in mine)
            own_total = sum(len(batch) for batch in mine)
        reporter.start("infer", total=(len(skipped) if main else 0) + own_total)
        if main:
            for i in skipped:
                item, paths = plans[i]
                reporter.advance(1)
                yield {"id": item.id, "image": str(item.path), "skipped": True,
                       "outputs": {k: str(p) for k, p in paths.items()}}
        own: list[dict[str, Any]] = []
        for summary in _predict_batches(model, batches, classes, steps, cfg, device, amp, probs,
                                        reporter, opacity, records, views["scales"],
                                        views["flip"]):
            if not main:
                own.append(summary)  # for rank 0 to report
            yield summary
        if probs is not None:
            probs.close(commit=False)  # this rank's last part is complete
        barrier()  # every rank's parts are complete
        together(lambda: _finish(probs, out, overwrite, settings) if main else None)
        others = gather_to_main(own) if info.enabled else None
    finally:
        # Entries are complete one by one: keep what was done, even after an error or ^C,
        # so a re-run resumes from there (rank 0 merges the parts finished so far).
        if probs is not None:
            probs.close(commit=main)
    for rank_summaries in (others or [])[1:]:
        yield from rank_summaries


def _finish(probs: ProbsWriter | None, out: Path | None, overwrite: bool,
            settings: dict[str, Any]) -> None:
    """Rank 0, once every image is done: merge the probabilities, mark the folder complete."""
    if probs is not None:
        probs.close()
    if out is not None and overwrite:
        write_run_info(out, settings)  # every output is now of these settings


def _loaded(todo: list[tuple[InputImage, dict[str, Path]]]
            ) -> Iterator[tuple[InputImage, dict[str, Path], np.ndarray, str]]:
    """(image, its output paths, decoded RGB, hash of its file) for each image to predict."""
    from discli.data.images import read_image

    for item, paths in todo:
        rgb = read_image(item.path)
        yield item, paths, rgb, input_hash(item.path)


def _predict_batches(model: DISNet,
                     batches: Iterable[list[tuple[InputImage, dict[str, Path], np.ndarray, str]]],
                     classes: Sequence[str], steps: int, cfg: InferenceConfig,
                     device: torch.device, amp: bool, probs: ProbsWriter | None,
                     reporter: Reporter, opacity: float = 0.5,
                     records: OutputRecords | None = None, scales: Sequence[float] = (1.0,),
                     flip: bool = False) -> Iterator[dict[str, Any]]:
    names = list(classes)
    for batch in batches:
        images = normalize_batch([rgb for _, _, rgb, _ in batch], device)
        size = batch[0][2].shape[:2]
        start = time.perf_counter()
        result = infer_views(model, images, [steps], cfg, scales, flip, amp)[steps]
        full = result.probs
        labelmaps = full.argmax(dim=1).to(torch.uint8).cpu().numpy()
        synchronize(device)
        ms = 1000 * (time.perf_counter() - start) / len(batch)
        tag_probs = result.tag_probs.float().cpu().numpy()
        for i, (item, paths, rgb, digest) in enumerate(batch):
            lm = labelmaps[i]
            if "labelmap" in paths:
                write_index_png(paths["labelmap"], lm)
                write_color_png(paths["color"], lm)
            if "overlay" in paths:
                write_overlay(paths["overlay"], rgb, lm, opacity)
            if records is not None and paths:
                records.add(item.id, digest)  # after its files: a kill before it redoes them
            if probs is not None:
                probs.add(item.id, full[i].cpu().numpy(), tag_probs[i], digest)
            counts = np.bincount(lm.reshape(-1), minlength=len(names))
            order = np.argsort(-counts, kind="stable")
            reporter.advance(1)
            yield {"id": item.id, "image": str(item.path), "size": [int(size[0]), int(size[1])],
                   "skipped": False, "outputs": {k: str(p) for k, p in paths.items()},
                   "classes": {names[k]: round(float(counts[k]) / lm.size, 4) for k in order
                               if counts[k] > 0},
                   "tags": {names[k]: round(float(tag_probs[i][k]), 4)
                            for k in range(1, len(names))},
                   "loss": float(result.loss[i]), "ms": round(ms, 2)}
