"""Tagged images with their E-step pseudo-labels as ground truth, for the M-step.

Each item looks like a :class:`discli.data.dataset.SegDataset` item, but

- the labelmap is the cached pseudo-labelmap; pixels whose confidence is below ``confidence``
  become 255 (ignored), and with ``tag_gate`` so do pixels of a class that the image's tags
  say is absent (``"cleaned"``: its cleaned tags, so that the labelmap and the tags inferred
  for an image agree; ``"noisy"``: its caption, which keeps the forward pass of t_tr = 0 from
  teaching the classes it imagines; ``"none"``: no gate);
- the tag target follows Eq. 1, whose tag loss runs over T = {T^f, T^w, T̂^w}: ``"noisy"`` trains
  v3 on the caption tags T^w, ``"cleaned"`` on the cleaned tags T̂^w (made by the run's
  :class:`discli.pseudo.tags.TagRule`), ``"mix"`` on both, T^w and T̂^w as two terms of the loss
  (the binary cross-entropy is linear in its target, so this is the soft target of their average:
  1 where both agree a class is present, 0.5 where they disagree). Background is always
  present.

With ``cutmix`` > 0, that share of the items gets a box pasted from another tagged image (the
box's image, pseudo-labelmap and ignored pixels alike; tags: the union of both targets), the
strong augmentation of CutMix-based semi-supervised segmentation (French et al. 2020; ST++,
UniMatch) with the pseudo-labels fixed by the E-step: the model must find each class's pixels
out of their usual context. Colour perturbations, the other half of those methods' strong
view, change what identifies a class on data where colour does (``strong_aug``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from discli.pseudo.cache import PseudoCache
from discli.data.dataset import SegDataset, Transform
from discli.data.images import read_image
from discli.data.manifest import Manifest
from discli.errors import BadInputError
from discli.model.losses import IGNORE_INDEX
from discli.model.net import BACKGROUND
from discli.pseudo.tags import GATES, apply_gate
from discli.train.keys import TrainConfig

TAG_TARGETS = ("noisy", "cleaned", "mix")


def tag_target(noisy: np.ndarray, cleaned_tags: np.ndarray, kind: str) -> torch.Tensor:
    """The (K,) tag target of one tagged image for the M-step from its caption tags and its
    cleaned tags (bool or 0/1, (K,); see the module docstring)."""
    noisy_t = torch.from_numpy(noisy.astype(np.float32))
    cleaned = torch.from_numpy(cleaned_tags.astype(np.float32))
    if kind == "noisy":
        target = noisy_t
    elif kind == "cleaned":
        target = cleaned
    elif kind == "mix":
        target = 0.5 * (noisy_t + cleaned)
    else:
        raise ValueError(f"tag target must be one of {', '.join(TAG_TARGETS)}, got {kind!r}")
    target[BACKGROUND] = 1.0
    return target


def class_thresholds(cache: PseudoCache, confidence: float, keep: float,
                     max_images: int = 2000) -> np.ndarray:
    """Per-class confidence thresholds (class-balanced self-training, Zou et al. 2018): for
    each class, the confidence above which the most confident ``keep`` share of its pixels
    lies, capped at ``confidence``. A class the model is unsure of keeps its best pixels
    instead of vanishing from the pseudo-labels, which is how self-training drifts away from
    rare classes. Estimated on the first ``max_images`` entries of the cache."""
    k = len(cache.classes)
    per_class: list[list[np.ndarray]] = [[] for _ in range(k)]
    for i, image_id in enumerate(cache.ids()):
        if i >= max_images:
            break
        entry = cache.get(image_id)
        conf = entry.confidence.astype(np.float32).ravel()
        labels = entry.labelmap.ravel()
        for c in np.unique(labels):
            if c < k:
                per_class[c].append(conf[labels == c])
    thresholds = np.full(k, confidence, dtype=np.float32)
    for c, parts in enumerate(per_class):
        if parts:
            values = np.concatenate(parts)
            thresholds[c] = min(confidence, float(np.quantile(values, 1.0 - keep)))
    return thresholds


def cutmix_box(height: int, width: int, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> tuple[int, int, int, int]:
    """A random box (top, left, box height, box width) covering ``area`` of the image at an
    aspect ratio within ``ratio``, drawn with torch's generator (seeded per item)."""
    r = torch.rand(4).tolist()
    size = (area[0] + r[0] * (area[1] - area[0])) * height * width
    aspect = ratio[0] + r[1] * (ratio[1] - ratio[0])
    bh = max(1, min(height, round((size / aspect) ** 0.5)))
    bw = max(1, min(width, round((size * aspect) ** 0.5)))
    return int(r[2] * (height - bh + 1)), int(r[3] * (width - bw + 1)), bh, bw


def paste(item: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``item`` with a random box of ``other`` (same crop size) pasted in: image, labelmap and
    the union of the two tag targets."""
    h = min(item["image"].shape[-2], other["image"].shape[-2])
    w = min(item["image"].shape[-1], other["image"].shape[-1])
    top, left, bh, bw = cutmix_box(h, w)
    box = (slice(top, top + bh), slice(left, left + bw))
    item["image"][(slice(None), *box)] = other["image"][(slice(None), *box)]
    item["labelmap"][box] = other["labelmap"][box]
    item["tags"] = torch.maximum(item["tags"], other["tags"])
    return item


class PseudoLabelled(SegDataset):
    """The tagged images of ``manifest`` with their pseudo-labels in ``cache``, as the M-step of
    a run with the settings ``cfg`` trains on them: its ``confidence``, tag rule
    (:meth:`discli.train.keys.TrainConfig.tag_cleaning`), tag target ``mstep_tags``,
    ``tag_gate``, ``class_keep`` and ``cutmix`` (module docstring)."""

    def __init__(self, manifest: Manifest, cache: PseudoCache, transform: Transform,
                 cfg: TrainConfig):
        super().__init__(manifest, transform, use_labelmaps=False)
        missing = [r.id for r in manifest.records if r.id not in cache]
        if missing:
            raise BadInputError(f"{len(missing)} tagged images have no entry (first: "
                                f"{missing[0]!r}); re-run the E-step", cache.path)
        tags, tag_gate = cfg.mstep_tags, cfg.tag_gate
        if tags not in TAG_TARGETS:
            raise ValueError(f"tag target must be one of {', '.join(TAG_TARGETS)}, got {tags!r}")
        if tag_gate not in GATES:
            raise ValueError(f"tag gate must be one of {', '.join(GATES)}, got {tag_gate!r}")
        self.cache, self.confidence, self.rule = cache, cfg.confidence, cfg.tag_cleaning()
        self.tags, self.tag_gate, self.cutmix = tags, tag_gate, cfg.cutmix
        self.thresholds = (class_thresholds(cache, cfg.confidence, cfg.class_keep)
                           if cfg.class_keep > 0 else None)

    def unmixed(self) -> PseudoLabelled:
        """The same images without CutMix."""
        plain = copy.copy(self)
        plain.cutmix = 0.0
        return plain

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.pseudo_item(index)
        if self.cutmix > 0 and float(torch.rand(1)) < self.cutmix:
            other = int(torch.randint(len(self.manifest.records), (1,)))
            item = paste(item, self.pseudo_item(other))
        return item

    def pseudo_item(self, index: int) -> dict[str, Any]:
        image_id, image, labelmap, tags = self.decoded(index, self._decode_pseudo)
        return self.make_item(image_id, index, image, labelmap, tags.clone(), True)

    def _decode_pseudo(self, index: int) -> tuple[str, np.ndarray, np.ndarray, torch.Tensor]:
        """An image with its gated pseudo-labelmap and tag target, before the transform."""
        rec = self.manifest.records[index]
        image = read_image(self.manifest.image_path(rec))
        entry = self.cache.get(rec.id)
        labelmap = entry.labelmap.copy()
        # the rule reads the whole pseudo-labelmap (before the confidence threshold), as the
        # E-step wrote it and `dis clean-tags` reads it
        cleaned = self.rule.clean(entry.noisy_tags > 0, entry.tag_probs, entry.labelmap)
        if labelmap.shape != image.shape[:2]:
            raise BadInputError(f"cached labelmap of {rec.id!r} is {labelmap.shape}, its image "
                                f"{image.shape[:2]}", self.cache.path)
        conf = entry.confidence.astype(np.float32)
        if self.thresholds is None:
            labelmap[conf < self.confidence] = IGNORE_INDEX
        else:
            limit = np.append(self.thresholds, np.ones(256 - len(self.thresholds), np.float32))
            labelmap[conf < limit[labelmap]] = IGNORE_INDEX
        labelmap = apply_gate(labelmap, self.tag_gate, entry.noisy_tags > 0, cleaned)
        tags = tag_target(entry.noisy_tags, cleaned, self.tags)
        return rec.id, image, labelmap, tags
