"""Scenes of the synthetic benchmark: a cluttered background and 1-3 objects, with labelmap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from discli.data.labelmap import IGNORE, labelmap_tags
from discli.synth.looks import (ACCENTS, DIFFICULTIES, Difficulty, Look,
                                _colour, _pick, _purer, _texture)
from discli.synth.shapes import ANY_LOOK, SHAPES, Placement, _distractor, _local, _rect


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
        lu, lv = _local(X, Y, Placement(cx, cy, r, rng.uniform(0, np.pi)))
        mask = _distractor(lu, lv, rng) if rng.random() < 0.5 else \
            _rect(lu, lv, -1, 1, -rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3))
        look = level.looks[_pick(rng, {k: 1.0 for k in level.looks})] \
            if rng.random() < level.clutter_object_look else level.background
        img = np.where(mask[..., None], _texture(rng, look, lu, lv), img)
    return img


def _distractors(rng, X, Y, img: np.ndarray, level: Difficulty) -> np.ndarray:
    """Background things of object size, dressed like objects; drawn before the objects, so
    that these partly hide them."""
    h, w = X.shape
    for _ in range(int(rng.integers(level.distractors[0], level.distractors[1] + 1))):
        s = rng.uniform(0.18, 0.4) * min(h, w)
        lu, lv = _local(X, Y, Placement(rng.uniform(0, w), rng.uniform(0, h), s,
                                        rng.uniform(0, 2 * np.pi), 1, rng.uniform(0.8, 1.2),
                                        rng.uniform(0.8, 1.2)))
        look = level.looks[_pick(rng, {k: 1.0 for k in level.looks})]
        img = np.where(_distractor(lu, lv, rng)[..., None], _texture(rng, look, lu, lv), img)
    return img


def _centre(rng, prev: tuple[float, float, float] | None, s: float, h: int, w: int,
            level: Difficulty) -> tuple[float, float]:
    """Where the next object of half-size ``s`` goes: often next to the previous one
    (``prev``: its centre and size), touching or overlapping it."""
    if prev is not None and rng.random() < level.touch:
        angle = rng.uniform(0, 2 * np.pi)
        dist = (prev[2] + s) * rng.uniform(0.5, 1.0)
        return (float(np.clip(prev[0] + dist * np.cos(angle), 0.1 * w, 0.9 * w)),
                float(np.clip(prev[1] + dist * np.sin(angle), 0.1 * h, 0.9 * h)))
    return rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)


def _paint_object(rng, img: np.ndarray, label: np.ndarray, k: int, name: str,
                  uv: tuple[np.ndarray, np.ndarray], level: Difficulty) -> np.ndarray:
    """Draw class ``k`` (``name``) at shape coordinates ``uv``, part by part, into ``img`` and
    (in place) ``label``."""
    lu, lv = uv
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
    return img


def _objects(rng, X, Y, img: np.ndarray, label: np.ndarray, classes: Sequence[str],
             level: Difficulty) -> tuple[np.ndarray, list[int]]:
    """Draw 1-3 objects into ``img`` and (in place) ``label``; returns the image and the
    class index of every object drawn."""
    h, w = X.shape
    n_objects = int(rng.choice([1, 2, 3], p=list(level.objects)))
    objects = [int(rng.integers(1, len(classes))) for _ in range(n_objects)]
    prev = None
    for k in objects:
        s = rng.uniform(*level.object_scale) * min(h, w)
        cx, cy = _centre(rng, prev, s, h, w, level)
        prev = (cx, cy, s)
        at = Placement(cx, cy, s, rng.uniform(-0.4, 0.4), 1 if rng.random() < 0.5 else -1,
                       rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15))
        img = _paint_object(rng, img, label, k, classes[k], _local(X, Y, at), level)
    return img, objects


def _occlude(rng, X, Y, img: np.ndarray, label: np.ndarray, level: Difficulty) -> np.ndarray:
    """Sometimes a pole or a branch in front of everything: background again (in ``label``
    too, in place)."""
    h, w = X.shape
    if rng.random() < level.occluder:
        lu, lv = _local(X, Y, Placement(rng.uniform(0, w), rng.uniform(0, h),
                                        min(h, w) * rng.uniform(0.3, 0.6), rng.uniform(0, np.pi)))
        mask = _rect(lu, lv, -1, 1, -0.05, 0.05)
        img = np.where(mask[..., None], _texture(rng, level.background, lu, lv), img)
        label[mask] = 0
    return img


def _camera(rng, X, Y, img: np.ndarray) -> np.ndarray:
    """What the camera adds: blur, a light gradient, sensor noise; the uint8 image."""
    h, w = X.shape
    img = ndimage.gaussian_filter(img, sigma=(rng.uniform(0.3, 0.8),) * 2 + (0,))
    light = 1 + rng.uniform(-0.2, 0.2) * (X / w - 0.5) + rng.uniform(-0.2, 0.2) * (Y / h - 0.5)
    img = img * light[..., None] + rng.normal(0, rng.uniform(3, 9), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _void_borders(label: np.ndarray) -> None:
    """VOC-style void border, in place: object pixels touching another label become 255."""
    edge = np.zeros_like(label, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    label[edge & (label > 0)] = IGNORE


def render_scene(rng: np.random.Generator, classes: Sequence[str], size: tuple[int, int],
                 difficulty: str = "medium") -> Scene:
    """Draw one image and its labelmap; ``classes`` is the class list, background first."""
    level = DIFFICULTIES[difficulty]
    h, w = size
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    img = _distractors(rng, X, Y, _background(rng, X, Y, h, w, level), level)
    label = np.zeros((h, w), dtype=np.uint8)
    img, objects = _objects(rng, X, Y, img, label, classes, level)
    image = _camera(rng, X, Y, _occlude(rng, X, Y, img, label, level))
    # instances that are still visible (before the void borders thin them)
    counts = {classes[k]: objects.count(k) for k in sorted(set(objects))
              if (label == k).sum() >= 12}
    _void_borders(label)
    present = set(labelmap_tags(label, classes))
    return Scene(image, label, {c: n for c, n in counts.items() if c in present})
