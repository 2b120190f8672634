"""The E-step (section 3.1, "Inference in Training"): pseudo-labels for every tagged image.

With the weights frozen, training-time inference (t_tr steps of gradient descent on u1, v1
against reconstruction + noisy-tag loss) runs on each tagged image at its own resolution; the
final labelmap (u3 re-weighted by v3, upsampled to the image size), the probability of the chosen
class per pixel, and the cleaned tag probabilities sigmoid(v3) go to an HDF5 cache
(:mod:`discli.cache`). ``t_tr = 0`` is the no-inference ablation (setup 1 of Table 3).

Images are batched by size (never padded: padding would change avgpool(u1) and the borders, so an
image's pseudo-label would depend on its batch mates). Under torchrun the size buckets are dealt
round-robin to the ranks, each writes its own part files, and rank 0 merges them.

Resuming after a kill gives the cache an uninterrupted run would have written, bit for bit: a
part file holds whole batches only, and a size bucket's batches are consecutive slices of its
sorted members, so removing finished batches leaves the remaining batches exactly as planned.
The cache is locked while the E-step writes it (:func:`discli.lock.lock_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from discli.cache import CacheEntry, CacheWriter, make_attrs
from discli.distributed import DistInfo, barrier, dist_info
from discli.inference import InferenceConfig, infer
from discli.lock import lock_file, remove_stale_temps
from discli.losses import IGNORE_INDEX
from discli.model import DISNet
from discli.progress import NullReporter, Reporter

PART_IMAGES = 64  # images per crash-safe part file: a kill loses at most this much work


def size_buckets(sizes: list[tuple[int, int]], indices: list[int], batch_size: int
                 ) -> list[list[int]]:
    """Batches of dataset indices whose images share one size, in a deterministic order."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_size.setdefault(sizes[i], []).append(i)
    batches = []
    for size in sorted(by_size):
        members = by_size[size]
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


def image_sizes(manifest: Any) -> list[tuple[int, int]]:
    """(H, W) of every image as it will be decoded (EXIF rotation applied), from the headers;
    a missing, empty or unreadable file is a BadInputError naming it."""
    from discli.data.images import probe_image

    return [probe_image(manifest.image_path(rec)) for rec in manifest.records]


def pseudo_entries(result_probs: torch.Tensor, v3: torch.Tensor, batch: dict[str, Any],
                   u3: torch.Tensor | None = None) -> list[CacheEntry]:
    """Cache entries of a batch: the final labelmap (u3 re-weighted by v3) at image size, its
    per-pixel confidence and the cleaned tag probabilities. With ``u3`` given, pixels whose class
    the tag re-weighting changed (a class the tags call absent, taken over by another or by the
    background) are marked 255: the tags say what they are not, not what they are."""
    size = batch["image"].shape[-2:]
    probs = F.interpolate(result_probs, size=size, mode="bilinear", align_corners=False)
    confidence, labelmap = probs.max(dim=1)
    labelmap = labelmap.to(torch.uint8)
    if u3 is not None:
        plain = F.interpolate(u3.float().softmax(dim=1), size=size, mode="bilinear",
                              align_corners=False).argmax(dim=1)
        labelmap[plain != labelmap] = IGNORE_INDEX
    tag_probs = torch.sigmoid(v3)
    return [CacheEntry(id=batch["id"][i], labelmap=labelmap[i].cpu().numpy(),
                       confidence=confidence[i].half().cpu().numpy(),
                       tag_probs=tag_probs[i].float().cpu().numpy(),
                       noisy_tags=(batch["tags"][i] > 0.5).to(torch.uint8).numpy())
            for i in range(len(batch["id"]))]


def run_estep(model: DISNet, manifest: Any, cache_path: str | Path, *, t_tr: int,
              inference: InferenceConfig, checkpoint_hash: str, batch_size: int = 8,
              device: str | torch.device = "cpu", num_workers: int = 0,
              reporter: Reporter | None = None, force: bool = False, amp: bool = False,
              dist: DistInfo | None = None, part_images: int = PART_IMAGES,
              ignore_suppressed: bool = False, pseudo_map: str = "final") -> Path:
    """Write (or finish) the pseudo-label cache of ``manifest``'s images; returns its path.

    ``part_images``: images per crash-safe part file (rounded up to whole batches).
    """
    if t_tr < 0:
        raise ValueError(f"t_tr must be >= 0, got {t_tr}")
    dist = dist or dist_info()
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(cache_path):
        return _run_estep(model, manifest, cache_path, t_tr=t_tr, inference=inference,
                          checkpoint_hash=checkpoint_hash, batch_size=batch_size, device=device,
                          num_workers=num_workers, reporter=reporter, force=force, amp=amp,
                          dist=dist, part_images=part_images,
                          ignore_suppressed=ignore_suppressed, pseudo_map=pseudo_map)


def _run_estep(model: DISNet, manifest: Any, cache_path: Path, *, t_tr: int,
               inference: InferenceConfig, checkpoint_hash: str, batch_size: int,
               device: str | torch.device, num_workers: int, reporter: Reporter | None,
               force: bool, amp: bool, dist: DistInfo, part_images: int,
               ignore_suppressed: bool, pseudo_map: str) -> Path:
    from discli.data.dataset import SegDataset, collate, eval_transform

    reporter = reporter or NullReporter()
    device = torch.device(device)
    if dist.is_main:
        remove_stale_temps(cache_path.parent)
        remove_stale_temps(cache_path.with_name(cache_path.name.removesuffix(".h5") + ".parts"))
    cfg = InferenceConfig(**{**inference.__dict__, "steps": t_tr})
    attrs = make_attrs(manifest.classes, t_tr, checkpoint_hash,
                       {**cfg.__dict__, "ignore_suppressed": ignore_suppressed,
                        "pseudo_map": pseudo_map})
    writer = CacheWriter(cache_path, attrs, rank=dist.rank, force=force)
    done = writer.done_ids()
    barrier()  # every rank must see the same finished set before anyone writes a new part
    todo = [i for i, rec in enumerate(manifest.records) if rec.id not in done]
    sizes = image_sizes(manifest)
    batches = size_buckets(sizes, todo, batch_size)[dist.rank::dist.world_size]
    dataset = SegDataset(manifest, transform=eval_transform(), use_labelmaps=False)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=num_workers)
    model.to(device).eval()
    reporter.start(f"E-step t_tr={t_tr}", sum(len(b) for b in batches))
    pending: list[CacheEntry] = []
    for batch in loader:
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and
                            device.type == "cuda"):
            result = infer(model, images, t_tr, cfg, tags=batch["tags"].to(device))
        probs = result.probs if pseudo_map == "final" else result.u3.float().softmax(dim=1)
        pending += pseudo_entries(probs.float(), result.v3, batch,
                                  result.u3 if ignore_suppressed else None)
        if len(pending) >= part_images:
            writer.write(pending)
            pending = []
        reporter.advance(len(batch["id"]), loss=float(result.losses[:, -1].mean()))
    writer.write(pending)
    barrier()
    if dist.is_main:
        writer.merge(expected_ids=[rec.id for rec in manifest.records])
    barrier()
    return cache_path


def cache_summary(cache_path: str | Path) -> dict[str, Any]:
    from discli.cache import PseudoCache

    cache = PseudoCache(cache_path)
    confidences = [float(np.mean(e.confidence)) for e in cache]
    return {"cache": str(cache_path), "images": len(cache),
            "mean_confidence": float(np.mean(confidences)) if confidences else 0.0}
