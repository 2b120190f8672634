"""How good is a pseudo-label cache? Statistics of its own, and scores against true labelmaps.

:func:`cache_stats` needs nothing but the cache (every E-step logs it to ``log.jsonl``): the mean
confidence of the pseudo-labelmaps, the share of pixels at or above the M-step's confidence
threshold (the pixels that are trained on), and how many tags the E-step changed.
:func:`score_cache` compares the pseudo-labelmaps with true labelmaps (the synthetic benchmark
writes them for its tagged images: ``manifests/tagged_oracle.jsonl``), over all pixels and over
the kept ones, with the VOC protocol of :mod:`discli.evaluation.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from discli.pseudo.cache import PseudoCache
from discli.errors import BadInputError
from discli.evaluation.metrics import ConfusionMatrix, IGNORE_INDEX
from discli.pseudo.tags import DEFAULT_THRESHOLD, TagRule, as_rule, entry_tags


def cache_stats(cache: PseudoCache, confidence: float = 0.0,
                rule: TagRule | float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The cache's own statistics; tags changed by cleaning with ``rule`` (a
    :class:`discli.pseudo.tags.TagRule` or a probability threshold)."""
    rule = as_rule(rule)
    pixels = kept = 0
    conf_sum = 0.0
    added = removed = changed_images = 0
    for entry in cache:
        conf = entry.confidence.astype(np.float32)
        pixels += conf.size
        conf_sum += float(conf.sum())
        kept += int(((conf >= confidence) & (entry.labelmap != IGNORE_INDEX)).sum())
        noisy, cleaned = entry_tags(entry, rule)
        added += int((cleaned & ~noisy).sum())
        removed += int((noisy & ~cleaned).sum())
        changed_images += int((cleaned != noisy).any())
    return {"images": len(cache), "mean_confidence": conf_sum / max(pixels, 1),
            "kept_share": kept / max(pixels, 1), "confidence": confidence,
            "tags_added": added, "tags_removed": removed, "images_with_changed_tags":
            changed_images}


def score_cache(cache: PseudoCache, truth: Any, confidence: float = 0.0) -> dict[str, Any]:
    """Score the cache's labelmaps against ``truth`` (a manifest whose records have labelmaps,
    ids matching the cache's): ``{"images", "all": scores, "kept": scores, "kept_share"}``,
    scores as :func:`discli.evaluation.metrics.segmentation_scores`. "all" counts every pixel the
    cache gives a class (not those it marks 255), "kept" only those whose confidence is also >=
    ``confidence``: the pixels an M-step with that threshold trains on."""
    from discli.data.labelmap import read_labelmap

    if list(truth.classes) != list(cache.classes):
        raise BadInputError(f"classes {truth.classes} differ from the cache's {cache.classes}",
                            truth.path)
    k = len(cache.classes)
    every, kept_only = ConfusionMatrix(k), ConfusionMatrix(k)
    images = kept = pixels = 0
    for rec in truth.records:
        path = truth.labelmap_path(rec)
        if path is None or rec.id not in cache:
            continue
        entry = cache.get(rec.id)
        gt = read_labelmap(path, k)
        if gt.shape != entry.labelmap.shape:
            raise BadInputError(f"labelmap of {rec.id!r} is {gt.shape}, its pseudo-labelmap "
                                f"{entry.labelmap.shape}", path)
        pred = torch.from_numpy(entry.labelmap.astype(np.int64))
        target = torch.from_numpy(gt.astype(np.int64))
        labelled = pred != IGNORE_INDEX
        void = torch.full_like(target, IGNORE_INDEX)
        every.update(pred, torch.where(labelled, target, void))
        mask = torch.from_numpy(entry.confidence.astype(np.float32) >= confidence) & labelled
        kept_only.update(pred, torch.where(mask, target, void))
        valid = target != IGNORE_INDEX
        kept += int((mask & valid).sum())
        pixels += int(valid.sum())
        images += 1
    if images == 0:
        raise BadInputError("no record has both a labelmap and a cache entry", truth.path)
    return {"images": images, "confidence": confidence, "kept_share": kept / max(pixels, 1),
            "all": every.compute(cache.classes), "kept": kept_only.compute(cache.classes)}
