"""The E-step (section 3.1, "Inference in Training"): pseudo-labels for every tagged image.

With the weights frozen, training-time inference (t_tr steps of gradient descent on u1, v1
against reconstruction + noisy-tag loss) runs on each tagged image at its own resolution; the
final labelmap (u3 re-weighted by v3, upsampled to the image size), the probability of the chosen
class per pixel, and the cleaned tag probabilities sigmoid(v3) go to an HDF5 cache
(:mod:`discli.pseudo.cache`). ``t_tr = 0`` is the no-inference ablation (setup 1 of Table 3).

Inference runs through the runtime (:mod:`discli.infer.runtime`): images batched by size (never
padded), in the resumable plan that rank 0 makes from the image headers; under torchrun the
batches are dealt round-robin to the ranks, each writes its own part files, and rank 0 merges
them.

Resuming after a kill gives the cache an uninterrupted run would have written, bit for bit: a
part file holds whole batches only, and a size bucket's batches are consecutive slices of its
sorted members, so removing finished batches leaves the remaining batches exactly as planned.
The cache is locked while the E-step writes it (:func:`discli.storage.lock.lock_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from discli.pseudo.cache import CacheEntry, CacheWriter, make_attrs
from discli.distributed import DistInfo, barrier, dist_info
from discli.infer.loop import InferenceConfig
from discli.storage.lock import lock_file
from discli.model.losses import IGNORE_INDEX
from discli.model.net import DISNet
from discli.progress import NullReporter, Reporter
from discli.infer.runtime import Views, infer_views, shared_plan, upsample_probs

PART_IMAGES = 64  # images per crash-safe part file: a kill loses at most this much work


def cache_entries(probs: torch.Tensor, tag_probs: torch.Tensor, batch: dict[str, Any],
                  other: torch.Tensor | None = None) -> list[CacheEntry]:
    """Cache entries of a batch from image-size probabilities (B,K,H,W): the pseudo-labelmap
    (their argmax), its per-pixel confidence and the cleaned tag probabilities. With ``other``
    (the other of the two maps: the labelmap head's softmax(u3) when ``probs`` is the final
    map re-weighted by the tags, or the final map when ``probs`` is softmax(u3)), pixels whose
    class the tag re-weighting changes (a class the tags call absent, taken over by another or
    by the background) are marked 255: the tags say what they are not, not what they are."""
    confidence, labelmap = probs.max(dim=1)
    labelmap = labelmap.to(torch.uint8)
    if other is not None:
        labelmap[other.argmax(dim=1) != labelmap] = IGNORE_INDEX
    return [CacheEntry(id=batch["id"][i], labelmap=labelmap[i].cpu().numpy(),
                       confidence=confidence[i].half().cpu().numpy(),
                       tag_probs=tag_probs[i].float().cpu().numpy(),
                       noisy_tags=(batch["tags"][i] > 0.5).to(torch.uint8).numpy())
            for i in range(len(batch["id"]))]


def pseudo_entries(result_probs: torch.Tensor, v3: torch.Tensor, batch: dict[str, Any],
                   u3: torch.Tensor | None = None) -> list[CacheEntry]:
    """:func:`cache_entries` from stride-8 results: ``result_probs`` and, with ``u3``, its
    softmax upsampled to the image size (:func:`discli.infer.runtime.upsample_probs`)."""
    size = tuple(batch["image"].shape[-2:])
    plain = None if u3 is None else upsample_probs(u3.float().softmax(dim=1), size)
    return cache_entries(upsample_probs(result_probs, size), torch.sigmoid(v3), batch, plain)


@dataclass(frozen=True)
class PseudoLabelling:
    """What makes a cache's pseudo-labels, all of it stamped in the cache's attributes (a cache
    made otherwise is refused): the hash of the model file, ``t_tr`` steps of the ``inference``
    settings (whose own ``steps`` are replaced), the map taken as the labelmap (``"final"``: u3
    re-weighted by v3; ``"labelmap"``: softmax(u3)), whether pixels whose class the tag
    re-weighting changed are ignored (:func:`cache_entries`), and ``flip``: each image inferred
    as it is and mirrored, the two probability maps (and tag probabilities) averaged
    (:func:`discli.infer.runtime.infer_views`)."""

    checkpoint_hash: str
    t_tr: int
    inference: InferenceConfig
    pseudo_map: str = "final"
    ignore_suppressed: bool = False
    flip: bool = False

    def inference_config(self) -> InferenceConfig:
        """``inference`` for ``t_tr`` steps."""
        return InferenceConfig(**{**self.inference.__dict__, "steps": self.t_tr})

    def settings(self) -> dict[str, Any]:
        """The settings the cache's attributes record."""
        return {**self.inference_config().__dict__, "ignore_suppressed": self.ignore_suppressed,
                "pseudo_map": self.pseudo_map, **({"flip": True} if self.flip else {})}


@dataclass(frozen=True)
class Execution:
    """Where and how the E-step runs; the batch size and part size never change the cache."""

    batch_size: int = 8
    device: str | torch.device | None = "cpu"  # None, "auto": run_clean resolves them
    num_workers: int = 0
    amp: bool = False
    part_images: int = PART_IMAGES  # images per crash-safe part file (whole batches)


def run_estep(model: DISNet, manifest: Any, cache_path: str | Path, labelling: PseudoLabelling,
              execution: Execution = Execution(), *, reporter: Reporter | None = None,
              force: bool = False, dist: DistInfo | None = None) -> Path:
    """Write (or finish) the pseudo-label cache of ``manifest``'s images; returns its path."""
    if labelling.t_tr < 0:
        raise ValueError(f"t_tr must be >= 0, got {labelling.t_tr}")
    dist = dist or dist_info()
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(cache_path):
        return _run_estep(model, manifest, cache_path, labelling, execution,
                          reporter or NullReporter(), force, dist)


def _run_estep(model: DISNet, manifest: Any, cache_path: Path, labelling: PseudoLabelling,
               execution: Execution, reporter: Reporter, force: bool, dist: DistInfo) -> Path:
    from discli.data.dataset import SegDataset, collate, eval_transform

    device, t_tr = torch.device(execution.device), labelling.t_tr
    cfg = labelling.inference_config()
    attrs = make_attrs(manifest.classes, t_tr, labelling.checkpoint_hash, labelling.settings())
    writer = CacheWriter(cache_path, attrs, rank=dist.rank, force=force)  # rank 0 cleans up
    done = writer.done_ids()
    barrier()  # every rank must see the same finished set before anyone writes a new part
    batches = shared_plan(lambda: [manifest.image_path(rec) for rec in manifest.records],
                          execution.batch_size, dist, resumable=True,
                          indices=lambda: [i for i, rec in enumerate(manifest.records)
                                           if rec.id not in done])
    dataset = SegDataset(manifest, transform=eval_transform(), use_labelmaps=False)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=execution.num_workers)
    model.to(device).eval()
    reporter.start(f"E-step t_tr={t_tr}", sum(len(b) for b in batches))
    pending: list[CacheEntry] = []
    labelmap_probs = labelling.pseudo_map != "final" or labelling.ignore_suppressed
    for batch in loader:
        images = batch["image"].to(device)
        full = infer_views(model, images, [t_tr], cfg, Views(flip=labelling.flip),
                           amp=execution.amp, tags=batch["tags"].to(device),
                           labelmap_probs=labelmap_probs)[t_tr]
        probs, other = ((full.probs, full.labelmap_probs) if labelling.pseudo_map == "final"
                        else (full.labelmap_probs, full.probs))
        assert probs is not None
        pending += cache_entries(probs, full.tag_probs, batch,
                                 other if labelling.ignore_suppressed else None)
        if len(pending) >= execution.part_images:
            writer.write(pending)
            pending = []
        reporter.advance(len(batch["id"]), loss=float(full.loss.mean()))
    writer.write(pending)
    barrier()
    if dist.is_main:
        writer.merge(expected_ids=[rec.id for rec in manifest.records])
    barrier()
    return cache_path
