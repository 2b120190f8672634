"""Scenes of the synthetic benchmark: a cluttered background and 1-3 objects, with labelmap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from discli.data.labelmap import IGNORE, labelmap_tags
from discli.synth.looks import (ACCENTS, DIFFICULTIES, Difficulty, Look,
                                _colour, _pick, _purer, _texture)
from discli.synth.shapes import ANY_LOOK, SHAPES, _distractor, _local, _rect


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    labelmap: np.ndarray  # uint8 (H, W), 255 on object borders
    counts: dict[str, int]  # visible instances per class name


def _background(rng, X, Y, h, w, level: Difficulty) -> np.ndarray:
    u, v = X / w * 2 - 1, Y / h * 2 - 1
    img = _texture(rng, level.background, u * rng.uniform(1, 2), v * rng.uniform(1, 2))
    if rng.random() < 0.6:  # a horizon: sky/ground or wall/floor
        y0 = rng.uniform(-0.5, 0.5) + rng.uniform(-0.2, 0.2) * u
        lower = _texture(rng, level.background, u * 2, v * 2)
        img = np.where((v > y0)[..., None], lower, img)
    # clutter: blobs, boxes and lines
    for _ in range(int(rng.integers(level.clutter[0], level.clutter[1] + 1))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(h, w)
        lu, lv = _local(X, Y, cx, cy, r, rng.uniform(0, np.pi), 1, 1, 1)
        mask = _distractor(lu, lv, rng) if rng.random() < 0.5 else \
            _rect(lu, lv, -1, 1, -rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3))
        look = level.looks[_pick(rng, {k: 1.0 for k in level.looks})] \
            if rng.random() < level.clutter_object_look else level.background
        img = np.where(mask[..., None], _texture(rng, look, lu, lv), img)
    return img


def render_scene(rng: np.random.Generator, classes: Sequence[str], size: tuple[int, int],
                 difficulty: str = "medium") -> Scene:
    """Draw one image and its labelmap; ``classes`` is the class list, background first."""
    level = DIFFICULTIES[difficulty]
    h, w = size
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    img = _background(rng, X, Y, h, w, level)
    label = np.zeros((h, w), dtype=np.uint8)
    side = min(h, w)
    # Distractors of object size, dressed like objects, before the objects (so partly hidden).
    for _ in range(int(rng.integers(level.distractors[0], level.distractors[1] + 1))):
        s = rng.uniform(0.18, 0.4) * side
        lu, lv = _local(X, Y, rng.uniform(0, w), rng.uniform(0, h), s, rng.uniform(0, 2 * np.pi),
                        1, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2))
        look = level.looks[_pick(rng, {k: 1.0 for k in level.looks})]
        img = np.where(_distractor(lu, lv, rng)[..., None], _texture(rng, look, lu, lv), img)
    n_objects = int(rng.choice([1, 2, 3], p=list(level.objects)))
    objects = [int(rng.integers(1, len(classes))) for _ in range(n_objects)]
    prev = None
    for k in objects:
        name = classes[k]
        s = rng.uniform(*level.object_scale) * side
        if prev is not None and rng.random() < level.touch:  # next to the previous one: touch/overlap
            angle = rng.uniform(0, 2 * np.pi)
            dist = (prev[2] + s) * rng.uniform(0.5, 1.0)
            cx = float(np.clip(prev[0] + dist * np.cos(angle), 0.1 * w, 0.9 * w))
            cy = float(np.clip(prev[1] + dist * np.sin(angle), 0.1 * h, 0.9 * h))
        else:
            cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        prev = (cx, cy, s)
        lu, lv = _local(X, Y, cx, cy, s, rng.uniform(-0.4, 0.4), 1 if rng.random() < 0.5 else -1,
                        rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15))
        look = _purer(level.looks.get(name, ANY_LOOK), level.look_purity)
        accent = _purer(ACCENTS.get(name, ANY_LOOK), level.look_purity)
        for mask, role in SHAPES[name](lu, lv, rng):
            if role == "body":
                colour = _texture(rng, look, lu, lv)
            elif role == "dark":
                colour = np.broadcast_to(_colour(rng, Look({"black": 1}, {})) * 0.6, img.shape)
            else:  # accents: windows, sails, beaks, eyes
                colour = _texture(rng, accent, lu, lv)
            img = np.where(mask[..., None], colour, img)
            label[mask] = k
    if rng.random() < level.occluder:  # a pole or a branch in front: background again
        lu, lv = _local(X, Y, rng.uniform(0, w), rng.uniform(0, h), side * rng.uniform(0.3, 0.6),
                        rng.uniform(0, np.pi), 1, 1, 1)
        mask = _rect(lu, lv, -1, 1, -0.05, 0.05)
        img = np.where(mask[..., None], _texture(rng, level.background, lu, lv), img)
        label[mask] = 0
    # Camera: blur, a light gradient, sensor noise.
    img = ndimage.gaussian_filter(img, sigma=(rng.uniform(0.3, 0.8),) * 2 + (0,))
    light = 1 + rng.uniform(-0.2, 0.2) * (X / w - 0.5) + rng.uniform(-0.2, 0.2) * (Y / h - 0.5)
    img = img * light[..., None] + rng.normal(0, rng.uniform(3, 9), img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    counts = {}
    for k in sorted(set(objects)):
        if (label == k).sum() >= 12:  # instances that are still visible
            counts[classes[k]] = objects.count(k)
    # VOC-style void border: object pixels touching another label become 255.
    edge = np.zeros_like(label, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    label[edge & (label > 0)] = IGNORE
    present = set(labelmap_tags(label, classes))
    return Scene(image, label, {c: n for c, n in counts.items() if c in present})
