"""Tagged images with their E-step pseudo-labels as ground truth, for the M-step.

Each item looks like a :class:`discli.data.dataset.SegDataset` item, but the labelmap is the
cached pseudo-labelmap (pixels whose confidence is below ``confidence`` become 255, ignored) and
the tags are the cleaned tags (cached tag probability >= ``tag_threshold``; background always 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from discli.cache import PseudoCache
from discli.data.dataset import SegDataset, Transform
from discli.data.images import read_image
from discli.data.manifest import Manifest
from discli.errors import BadInputError
from discli.losses import IGNORE_INDEX
from discli.model import BACKGROUND


class PseudoLabelled(SegDataset):
    def __init__(self, manifest: Manifest, cache: PseudoCache, transform: Transform,
                 confidence: float = 0.0, tag_threshold: float = 0.5):
        super().__init__(manifest, transform, use_labelmaps=False)
        missing = [r.id for r in manifest.records if r.id not in set(cache.ids())]
        if missing:
            raise BadInputError(f"{len(missing)} tagged images have no entry (first: "
                                f"{missing[0]!r}); re-run the E-step", cache.path)
        self.cache, self.confidence, self.tag_threshold = cache, confidence, tag_threshold

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.manifest.records[index]
        image = read_image(self.manifest.image_path(rec))
        entry = self.cache.get(rec.id)
        labelmap = entry.labelmap.copy()
        if labelmap.shape != image.shape[:2]:
            raise BadInputError(f"cached labelmap of {rec.id!r} is {labelmap.shape}, its image "
                                f"{image.shape[:2]}", self.cache.path)
        labelmap[entry.confidence.astype(np.float32) < self.confidence] = IGNORE_INDEX
        tags = torch.from_numpy((entry.tag_probs >= self.tag_threshold).astype(np.float32))
        tags[BACKGROUND] = 1.0
        return self.make_item(rec.id, index, image, labelmap, tags, True)
