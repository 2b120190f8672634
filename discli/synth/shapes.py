"""Shapes of the synthetic benchmark: every class as a set of parts (body, accents, dark bits),
the source classes of the ``shapes`` backbone weights, and background distractors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from discli.synth.looks import Look, PALETTE, TEXTURES


def _ellipse(u, v, cx, cy, a, b, rot=0.0):
    du, dv = u - cx, v - cy
    c, s = np.cos(rot), np.sin(rot)
    x, y = c * du + s * dv, -s * du + c * dv
    return (x / a) ** 2 + (y / b) ** 2 <= 1.0


def _poly(u, v, pts):
    """Inside a convex polygon (vertices in either order)."""
    signs = []
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        signs.append((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0))
    return np.all([s >= 0 for s in signs], axis=0) | np.all([s <= 0 for s in signs], axis=0)


def _rect(u, v, x0, x1, y0, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


Part = tuple[np.ndarray, str]  # (mask, role): role is "body", "accent" or "dark"


def _aeroplane(u, v, rng) -> list[Part]:
    span, sweep, thick = rng.uniform(0.65, 0.95), rng.uniform(0.1, 0.35), rng.uniform(0.18, 0.26)
    body = _ellipse(u, v, 0, 0, 0.97, thick)
    wings = _poly(u, v, [(0.35, 0), (0.35 - sweep, -span), (0.05 - sweep, -span), (-0.25, 0)]) \
        | _poly(u, v, [(0.35, 0), (0.35 - sweep, span), (0.05 - sweep, span), (-0.25, 0)])
    tail = _poly(u, v, [(-0.55, 0), (-0.8, -0.42), (-0.98, -0.42), (-0.95, 0)]) \
        | _poly(u, v, [(-0.55, 0), (-0.8, 0.42), (-0.98, 0.42), (-0.95, 0)])
    parts = [(body | wings | tail, "body")]
    if rng.random() < 0.5:  # a cockpit window
        parts.append((_ellipse(u, v, 0.72, 0, 0.14, thick * 0.6), "accent"))
    return parts


def _bird(u, v, rng) -> list[Part]:
    hx, hy = rng.uniform(0.45, 0.6), rng.uniform(-0.35, -0.15)
    body = _ellipse(u, v, -0.05, 0.1, 0.65, rng.uniform(0.36, 0.46), rng.uniform(-0.3, 0.1))
    head = _ellipse(u, v, hx, hy, 0.3, 0.3)
    tail = _poly(u, v, [(-0.5, -0.05), (-1.0, -0.2), (-0.95, 0.4)])
    wing = _poly(u, v, [(-0.4, 0.0), (0.3, 0.0), (-0.5, rng.uniform(-0.95, -0.3))])
    beak = _poly(u, v, [(hx + 0.2, hy - 0.1), (hx + 0.55, hy + 0.02), (hx + 0.2, hy + 0.12)])
    return [(body | head | tail | wing, "body"), (beak, "accent")]


def _boat(u, v, rng) -> list[Part]:
    deck, keel = rng.uniform(0.05, 0.2), rng.uniform(0.55, 0.7)
    hull = _poly(u, v, [(-0.95, deck), (1.0, deck - 0.1), (0.6, keel), (-0.7, keel)])
    mast = _rect(u, v, -0.06, 0.06, -0.97, deck)
    top = rng.uniform(-0.97, -0.7)
    sail = _poly(u, v, [(0.1, top), (0.1, deck - 0.08), (rng.uniform(0.6, 0.9), deck - 0.08)])
    parts = [(hull | mast, "body"), (sail, "accent")]
    if rng.random() < 0.7:
        parts.append((_poly(u, v, [(-0.1, top + 0.1), (-0.1, deck - 0.08),
                                   (rng.uniform(-0.75, -0.5), deck - 0.08)]), "accent"))
    return parts


def _car(u, v, rng) -> list[Part]:
    roof = rng.uniform(-0.55, -0.35)
    body = _rect(u, v, -0.95, 0.95, -0.05, 0.35) | _ellipse(u, v, 0.75, 0.15, 0.22, 0.22) \
        | _ellipse(u, v, -0.75, 0.15, 0.22, 0.22)
    cabin = _poly(u, v, [(-0.6, -0.05), (0.5, -0.05), (0.25, roof), (-0.45, roof)])
    window = _poly(u, v, [(-0.5, -0.1), (0.4, -0.1), (0.2, roof + 0.08), (-0.38, roof + 0.08)])
    r = rng.uniform(0.17, 0.23)
    wheels = _ellipse(u, v, -0.55, 0.38, r, r) | _ellipse(u, v, 0.55, 0.38, r, r)
    return [(body | cabin, "body"), (window, "accent"), (wheels, "dark")]


def _cat(u, v, rng) -> list[Part]:
    hx, hy = rng.uniform(0.45, 0.6), rng.uniform(-0.35, -0.15)
    body = _ellipse(u, v, -0.15, 0.1, 0.65, rng.uniform(0.34, 0.42))
    head = _ellipse(u, v, hx, hy, 0.3, 0.28)
    ears = _poly(u, v, [(hx - 0.26, hy - 0.1), (hx - 0.02, hy - 0.18), (hx - 0.18, hy - 0.52)]) \
        | _poly(u, v, [(hx + 0.02, hy - 0.18), (hx + 0.26, hy - 0.1), (hx + 0.18, hy - 0.52)])
    legs = np.zeros_like(body)
    for x in (-0.6, -0.38, 0.1, 0.32):
        legs |= _rect(u, v, x - 0.08, x + 0.08, 0.2, 0.68)
    tail = _ellipse(u, v, -0.85, -0.2, 0.38, 0.11, rng.uniform(0.8, 1.3))
    eyes = _ellipse(u, v, hx + 0.1, hy - 0.02, 0.07, 0.05)
    return [(body | head | ears | legs | tail, "body"), (eyes, "accent")]


# Source classes: shapes of other things, disjoint from the benchmark's classes, for pretraining
# a backbone the way ImageNet and COCO pretrain the paper's ResNet-101 for VOC
# (:mod:`discli.model.weights`). Any colour and texture, so only shape and parts tell them apart.
def _bottle(u, v, rng) -> list[Part]:
    w = rng.uniform(0.3, 0.45)
    body = _rect(u, v, -w, w, -0.2, 0.95) | _ellipse(u, v, 0, -0.2, w, 0.25)
    neck = _rect(u, v, -0.12, 0.12, -0.85, -0.3)
    return [(body | neck, "body"), (_rect(u, v, -0.15, 0.15, -1.0, -0.82), "accent")]


def _chair(u, v, rng) -> list[Part]:
    back = _rect(u, v, -0.7, -0.5, -1.0, 0.1)
    seat = _rect(u, v, -0.7, 0.6, 0.0, 0.18)
    legs = _rect(u, v, -0.7, -0.55, 0.1, 0.95) | _rect(u, v, 0.45, 0.6, 0.1, 0.95)
    return [(back | seat | legs, "body")]


def _tvmonitor(u, v, rng) -> list[Part]:
    top = rng.uniform(-0.8, -0.6)
    frame = _rect(u, v, -0.95, 0.95, top, 0.5)
    stand = _rect(u, v, -0.1, 0.1, 0.5, 0.8) | _rect(u, v, -0.45, 0.45, 0.8, 0.92)
    return [(frame | stand, "body"), (_rect(u, v, -0.82, 0.82, top + 0.12, 0.38), "accent")]


def _pottedplant(u, v, rng) -> list[Part]:
    pot = _poly(u, v, [(-0.45, 0.3), (0.45, 0.3), (0.3, 0.95), (-0.3, 0.95)])
    leaves = _ellipse(u, v, 0, -0.3, rng.uniform(0.6, 0.9), 0.6) | \
        _ellipse(u, v, -0.45, -0.1, 0.35, 0.3) | _ellipse(u, v, 0.45, -0.1, 0.35, 0.3)
    return [(leaves, "body"), (pot, "accent")]


def _house(u, v, rng) -> list[Part]:
    walls = _rect(u, v, -0.75, 0.75, -0.15, 0.95)
    roof = _poly(u, v, [(-0.95, -0.1), (0.95, -0.1), (0.0, rng.uniform(-1.0, -0.7))])
    door = _rect(u, v, -0.15, 0.15, 0.4, 0.95)
    return [(walls | roof, "body"), (door, "dark")]


def _fish(u, v, rng) -> list[Part]:
    body = _ellipse(u, v, 0.15, 0, 0.75, rng.uniform(0.3, 0.45))
    tail = _poly(u, v, [(-0.45, 0), (-1.0, -0.5), (-1.0, 0.5)])
    return [(body | tail, "body"), (_ellipse(u, v, 0.6, -0.08, 0.08, 0.08), "dark")]


def _umbrella(u, v, rng) -> list[Part]:
    canopy = _ellipse(u, v, 0, -0.1, 0.95, 0.7) & (v <= -0.1)
    handle = _rect(u, v, -0.05, 0.05, -0.1, 0.8) | _rect(u, v, -0.25, 0.05, 0.75, 0.85)
    return [(canopy | handle, "body")]


def _mushroom(u, v, rng) -> list[Part]:
    cap = _ellipse(u, v, 0, 0, 0.9, rng.uniform(0.55, 0.8)) & (v <= 0.05)
    stem = _rect(u, v, -0.22, 0.22, 0.0, 0.9)
    return [(cap, "body"), (stem, "accent")]


SHAPES: dict[str, Callable[..., list[Part]]] = {
    "aeroplane": _aeroplane, "bird": _bird, "boat": _boat, "car": _car, "cat": _cat,
    "bottle": _bottle, "chair": _chair, "tvmonitor": _tvmonitor, "pottedplant": _pottedplant,
    "house": _house, "fish": _fish, "umbrella": _umbrella, "mushroom": _mushroom}
DEFAULT_CLASSES = ["background", "aeroplane", "bird", "boat", "car", "cat"]
SOURCE_CLASSES = ["background", "bottle", "chair", "tvmonitor", "pottedplant", "house", "fish",
                  "umbrella", "mushroom"]
ANY_LOOK = Look({c: 1.0 for c in PALETTE}, {t: 1.0 for t in TEXTURES})  # the source classes'


def _distractor(u, v, rng) -> np.ndarray:
    """Background things made of object parts: an ellipse, a box, a triangle, a pair of wheels,
    a cross, a pole, or a blob with 'ears'."""
    kind = int(rng.integers(0, 7))
    if kind == 0:
        return _ellipse(u, v, 0, 0, rng.uniform(0.4, 0.95), rng.uniform(0.2, 0.6),
                        rng.uniform(0, np.pi))
    if kind == 1:
        return _rect(u, v, -rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9), -rng.uniform(0.2, 0.6),
                     rng.uniform(0.2, 0.6))
    if kind == 2:
        return _poly(u, v, [tuple(rng.uniform(-0.9, 0.9, 2)) for _ in range(3)])
    if kind == 3:
        r = rng.uniform(0.15, 0.3)
        return _ellipse(u, v, -0.5, 0, r, r) | _ellipse(u, v, 0.5, 0, r, r)
    if kind == 4:
        return _ellipse(u, v, 0, 0, 0.8, 0.12) | _ellipse(u, v, 0, 0, 0.12, 0.8)
    if kind == 5:
        return _rect(u, v, -0.06, 0.06, -1.0, 1.0)
    return _ellipse(u, v, 0, 0, 0.3, 0.3) | _poly(u, v, [(-0.25, -0.1), (0.0, -0.2),
                                                        (-0.2, -0.55)])


@dataclass(frozen=True)
class Placement:
    """Where a shape sits in the image: its centre (pixels), the pixels of one unit of shape
    coordinates, its rotation (radians), a mirroring (1 or -1) and a stretch along each of its
    own axes."""

    cx: float
    cy: float
    scale: float
    angle: float
    flip: int = 1
    ax: float = 1
    ay: float = 1


def _local(X, Y, at: Placement):
    """The shape coordinates (u, v) of every pixel (X, Y) for a shape placed ``at``."""
    dx, dy = (X - at.cx) / at.scale, (Y - at.cy) / at.scale
    c, s = np.cos(at.angle), np.sin(at.angle)
    return at.flip * (c * dx + s * dy) / at.ax, (-s * dx + c * dy) / at.ay
