"""A seeded synthetic benchmark: a fair miniature of semi-supervised segmentation with captions.

``generate_benchmark(out)`` writes, in the real formats (so the real preparation code runs on it)::

    OUT/VOCdevkit/VOC2012/JPEGImages/*.jpg           labelled and test images
    OUT/VOCdevkit/VOC2012/SegmentationClass/*.png    their labelmaps (VOC palette PNGs)
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt   the pixel-labelled part
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt     the test part
    OUT/idw/images/*.jpg, OUT/idw/captions.jsonl     the tagged part: web-style captions
    OUT/idw/true_tags.jsonl, OUT/idw/labels/*.png    hidden truth for measurement only
    OUT/classes.txt, OUT/benchmark.json              class list; settings and measured noise
    OUT/manifests/{train,val,tagged,tagged_oracle}.jsonl   (unless manifests=False)

What makes it a *fair* miniature rather than a colour-sorting toy (see
``shared/notes/findings.md``: a set whose classes differ only by colour puts the baseline above
90 mIoU and leaves no room for semi-supervision to show anything):

- classes differ by *shape* (aeroplane: fuselage, swept wings and tail; bird: body, head, beak,
  wing, tail; boat: hull, mast and sails; car: body, cabin, windows and wheels; cat: body, head,
  ears, legs and tail), with random aspect, rotation, mirroring and scale;
- colours and textures are drawn from class-dependent mixtures over *shared* palettes and
  texture kinds, so every colour and texture occurs in several classes and colour alone never
  decides the class;
- backgrounds are textured and cluttered, with distractor blobs that borrow the objects'
  colours, textures and part shapes (a lone ellipse, a triangle, a pair of dark circles, a
  cross) but are background, and occluders drawn over objects;
- 1 to 3 objects per image, often touching or overlapping; image sides vary (48-96 px by
  default); blur, sensor noise and JPEG compression; VOC-style 1-pixel void (255) borders;
- captions are sentences (templates, synonyms, plurals, counts, and words like "category",
  "cart", "boathouse" that must *not* be read as classes) whose tags are noisy like web
  captions: each present class is left unmentioned with probability ``miss_rate`` and, with
  probability ``spurious_rate``, an absent class is named. ``parse_caption`` of every caption
  gives exactly the intended noisy tags (checked while generating).

The difficulty levels (:data:`DIFFICULTIES`: clutter, distractors, occluders, how strongly a class
keeps to its typical look, object size) were measured with one seed, the ``tiny`` backbone (C =
64), AdamW 0.002, labelmap + tag loss on 64 px crops of batch 8, 1 CPU thread, mIoU on the 100
test images; *baseline* trains on the 30 labelled images, *bound* on those plus the 400 tagged
images with their true labelmaps:

- ``hard``: baseline 21 mIoU and bound 37 after 1000 steps of batch 16; even the bound of a full
  demo run stayed at 35, too little room for semi-supervision to show anything;
- ``easy``: baseline 25.4 after 2000 steps (it has overfitted its 30 images by then),
  bound 46.0 after 3000 steps (still underfitting); with 100 labelled images the baseline reaches
  36.4 after 1500 steps;
- ``medium`` (the generator's default) sits between them by construction; not measured in its
  final form;
- ``clear`` (at most one clutter item, no distractors or occluders, typical looks cubed) and
  ``vivid`` (the same with looks to the sixth power: a class mostly wears its typical colour, so
  the remaining confusions are between classes that share one, and shapes): with the demo's
  schedule (1500/300/500 steps, then 1200 more for the bound) and the shipped ``shapes`` backbone
  weights, ``clear`` gave baseline 28.4 and bound 50.0, ``vivid`` (the demo's) 34.3 and 54.6
  (one seed). From scratch ``clear`` gave 24.1 and 43.8; the stride-8 output itself is not the
  limit (perfect features pooled to stride 8 and upsampled score 85.8 mIoU at 48-96 px).

Colour alone, fitted on the test images themselves, reaches 0.23-0.27 mean IoU over the object
classes at every level (``tests/test_data_synthetic.py``), so shape always matters.

Every image draws from its own generator seeded by (seed, part, index): the same seed gives
byte-identical files, and changing ``n_tagged`` does not change the labelled or test images.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from discli.data.captions import parse_caption
from discli.data.fileio import atomic_write, read_text, write_text
from discli.data.idw import prepare_idw
from discli.data.manifest import Manifest, Record, parse_classes, write_manifest
from discli.data.prepare import prepare_voc
from discli.data.voc import IGNORE, labelmap_tags, write_palette_png
from discli.errors import UsageError

# --------------------------------------------------------------------------- appearance ------

# Shared colour prototypes (RGB). Each class (and each background) draws from several of them.
PALETTE = {
    "red": (190, 45, 40), "orange": (225, 135, 45), "yellow": (215, 195, 70),
    "green": (70, 150, 60), "blue": (55, 95, 190), "teal": (50, 150, 150),
    "white": (220, 220, 215), "grey": (125, 125, 130), "black": (45, 42, 40),
    "brown": (125, 80, 45),
}
TEXTURES = ("flat", "gradient", "stripes", "spots", "noise")


@dataclass(frozen=True)
class Look:
    """How a class tends to look: weights over PALETTE colours and TEXTURES (overlapping)."""
    colours: dict[str, float]
    textures: dict[str, float]


# Each class has a typical look (dominant colours and textures) plus less likely ones shared with
# other classes, like real categories: most cats are orange, grey or brown and furry, but a
# white cat exists, and so does a white car. Accents (sails, windows, beaks, eyes) have a look
# of their own per class: parts, not just silhouettes, carry the class.
LOOKS = {
    "aeroplane": Look({"white": 6, "grey": 4, "blue": 1, "red": 1, "yellow": 0.5},
                      {"gradient": 4, "flat": 3, "stripes": 1}),
    "bird": Look({"brown": 5, "black": 3, "yellow": 1, "white": 1, "blue": 0.5, "red": 0.5},
                 {"noise": 4, "spots": 3, "flat": 1}),
    "boat": Look({"red": 3, "blue": 3, "white": 2, "brown": 1.5, "teal": 0.5},
                 {"stripes": 4, "flat": 2, "gradient": 1}),
    "car": Look({"red": 4, "blue": 3, "yellow": 1, "black": 1, "grey": 1, "white": 0.5},
                {"gradient": 4, "flat": 2, "spots": 1}),
    "cat": Look({"orange": 4, "grey": 3, "brown": 2, "black": 1, "white": 0.5},
                {"stripes": 4, "noise": 3, "spots": 1}),
}
ACCENTS = {
    "aeroplane": Look({"black": 2, "blue": 1}, {"flat": 1}),
    "bird": Look({"orange": 2, "yellow": 2}, {"flat": 1}),
    "boat": Look({"white": 4, "yellow": 1, "red": 1}, {"flat": 3, "stripes": 1}),
    "car": Look({"white": 2, "blue": 1, "grey": 1}, {"gradient": 2, "flat": 1}),
    "cat": Look({"yellow": 2, "green": 2}, {"flat": 1}),
}
# Backgrounds use every colour, but mostly the muted outdoor ones.
BACKGROUND_LOOK = Look({"green": 4, "teal": 2, "blue": 2, "grey": 3, "brown": 3, "yellow": 1,
                        "white": 1, "orange": 0.5, "red": 0.3},
                       {"noise": 3, "gradient": 3, "stripes": 1, "spots": 0.5, "flat": 1})


@dataclass(frozen=True)
class Difficulty:
    """How hard a scene is. ``look_purity`` is an exponent on each class's look weights: above 1
    a class's typical colours and textures dominate (colour becomes a stronger cue), 1 keeps the
    overlapping mixtures above."""
    clutter: tuple[int, int]  # background clutter items per image (inclusive)
    clutter_object_look: float  # share of clutter dressed like an object class
    distractors: tuple[int, int]  # object-sized look-alike blobs per image (inclusive)
    occluder: float  # probability of a pole or branch in front of the objects
    look_purity: float
    object_scale: tuple[float, float]  # object half-extent as a share of the image's short side


# Measured with the demo's tiny backbone (see the module docstring): "hard" leaves even the
# fully supervised bound near 35 mIoU, too little room for semi-supervision to show anything.
DIFFICULTIES = {
    "clear": Difficulty((0, 1), 0.0, (0, 0), 0.0, 3.0, (0.25, 0.42)),
    "vivid": Difficulty((0, 1), 0.0, (0, 0), 0.0, 6.0, (0.25, 0.42)),
    "easy": Difficulty((0, 2), 0.0, (0, 0), 0.0, 2.0, (0.22, 0.4)),
    "medium": Difficulty((1, 3), 0.1, (0, 1), 0.15, 1.5, (0.25, 0.45)),
    "hard": Difficulty((2, 5), 0.25, (0, 2), 0.3, 1.0, (0.3, 0.55)),
}


def _purer(look: Look, power: float) -> Look:
    return Look({k: w ** power for k, w in look.colours.items()},
                {k: w ** power for k, w in look.textures.items()})


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _colour(rng: np.random.Generator, look: Look) -> np.ndarray:
    base = np.array(PALETTE[_pick(rng, look.colours)], dtype=np.float32)
    return np.clip(base * rng.uniform(0.75, 1.2) + rng.normal(0, 18, 3), 0, 255)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), sigma)
    return field_ / (field_.std() + 1e-6)


def _texture(rng: np.random.Generator, look: Look, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An (H, W, 3) colour field; u, v are the object's local coordinates (about -1..1)."""
    h, w = u.shape
    c1 = _colour(rng, look)
    kind = _pick(rng, look.textures)
    # The second colour: a shade of the first or another colour of the same look.
    c2 = c1 * rng.uniform(0.45, 0.75) if rng.random() < 0.6 else _colour(rng, look)
    out = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + 0.5 * (np.cos(angle) * u + np.sin(angle) * v), 0, 1)[..., None]
        out = (1 - t) * c1 + t * c2
    elif kind == "stripes":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 7)
        s = np.sin(freq * (np.cos(angle) * u + np.sin(angle) * v) + rng.uniform(0, 6.3))
        out = np.where((s > rng.uniform(-0.3, 0.3))[..., None], c1, c2)
    elif kind == "spots":
        t = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(3, 9))):
            cx, cy, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.1, 0.25)
            t |= (u - cx) ** 2 + (v - cy) ** 2 < r * r
        out = np.where(t[..., None], c2, c1)
    elif kind == "noise":
        n = _smooth_noise(rng, h, w, rng.uniform(0.6, 1.8))[..., None]
        out = c1 + n * rng.uniform(12, 28)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------ shapes ------

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
# (:mod:`discli.weights`). Any colour and texture, so only shape and parts tell them apart.
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


def _local(X, Y, cx, cy, scale, angle, flip, ax, ay):
    dx, dy = (X - cx) / scale, (Y - cy) / scale
    c, s = np.cos(angle), np.sin(angle)
    return flip * (c * dx + s * dy) / ax, (-s * dx + c * dy) / ay


# ------------------------------------------------------------------------------ scenes ------

@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    labelmap: np.ndarray  # uint8 (H, W), 255 on object borders
    counts: dict[str, int]  # visible instances per class name


def _background(rng, X, Y, h, w, level: Difficulty) -> np.ndarray:
    u, v = X / w * 2 - 1, Y / h * 2 - 1
    img = _texture(rng, BACKGROUND_LOOK, u * rng.uniform(1, 2), v * rng.uniform(1, 2))
    if rng.random() < 0.6:  # a horizon: sky/ground or wall/floor
        y0 = rng.uniform(-0.5, 0.5) + rng.uniform(-0.2, 0.2) * u
        lower = _texture(rng, BACKGROUND_LOOK, u * 2, v * 2)
        img = np.where((v > y0)[..., None], lower, img)
    # clutter: blobs, boxes and lines
    for _ in range(int(rng.integers(level.clutter[0], level.clutter[1] + 1))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(h, w)
        lu, lv = _local(X, Y, cx, cy, r, rng.uniform(0, np.pi), 1, 1, 1)
        mask = _distractor(lu, lv, rng) if rng.random() < 0.5 else \
            _rect(lu, lv, -1, 1, -rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3))
        look = LOOKS[_pick(rng, {k: 1.0 for k in LOOKS})] \
            if rng.random() < level.clutter_object_look else BACKGROUND_LOOK
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
        look = LOOKS[_pick(rng, {k: 1.0 for k in LOOKS})]
        img = np.where(_distractor(lu, lv, rng)[..., None], _texture(rng, look, lu, lv), img)
    n_objects = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    objects = [int(rng.integers(1, len(classes))) for _ in range(n_objects)]
    prev = None
    for k in objects:
        name = classes[k]
        s = rng.uniform(*level.object_scale) * side
        if prev is not None and rng.random() < 0.6:  # next to the previous one: touch/overlap
            angle = rng.uniform(0, 2 * np.pi)
            dist = (prev[2] + s) * rng.uniform(0.5, 1.0)
            cx = float(np.clip(prev[0] + dist * np.cos(angle), 0.1 * w, 0.9 * w))
            cy = float(np.clip(prev[1] + dist * np.sin(angle), 0.1 * h, 0.9 * h))
        else:
            cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        prev = (cx, cy, s)
        lu, lv = _local(X, Y, cx, cy, s, rng.uniform(-0.4, 0.4), 1 if rng.random() < 0.5 else -1,
                        rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15))
        look = _purer(LOOKS.get(name, ANY_LOOK), level.look_purity)
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
        img = np.where(mask[..., None], _texture(rng, BACKGROUND_LOOK, lu, lv), img)
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


# ---------------------------------------------------------------------------- captions ------

NOUNS = {  # (singular, plural) pairs, all in the shipped lexicon
    "aeroplane": [("aeroplane", "aeroplanes"), ("airplane", "airplanes"), ("plane", "planes"),
                  ("jet", "jets")],
    "bird": [("bird", "birds"), ("pigeon", "pigeons"), ("duck", "ducks"), ("seagull", "seagulls"),
             ("parrot", "parrots")],
    "boat": [("boat", "boats"), ("ship", "ships"), ("sailboat", "sailboats"), ("yacht", "yachts")],
    "car": [("car", "cars"), ("automobile", "automobiles"), ("taxi", "taxis"), ("jeep", "jeeps")],
    "cat": [("cat", "cats"), ("kitten", "kittens"), ("kitty", "kitties")],
}
TEMPLATES = ["A photo of {x}.", "{X} in this picture.", "Look at {x}!", "Here we see {x} {place}.",
             "{X} {place}, taken last summer.", "I took a picture of {x} {place}.",
             "Nice shot of {x}.", "{X}. What a lovely day!", "Just {x} {place}, nothing special."]
EMPTY = ["What a lovely day!", "Holiday memories.", "Just another afternoon outside.",
         "Look at this!", "No idea what this is."]
PLACES = ["near the river", "in the park", "by the road", "under a cloudy sky",
          "on a sunny afternoon", "at the harbour", "in the city", "next to a building"]
# Words that contain class names but must not be read as them (whole-word matching).
TRAPS = ["beside a shopping cart", "from an old catalogue", "near the boathouse",
         "on a striped carpet", "in every category", "like a cartoon", "with a scarf",
         "under the planets"]
NUMBERS = {2: "two", 3: "three", 4: "four"}


def _noun_phrase(rng, name: str, count: int) -> str:
    singular, plural = NOUNS[name][int(rng.integers(len(NOUNS[name])))]
    if count == 1:
        return ("an " if singular[0] in "aeiou" else "a ") + singular
    word = NUMBERS.get(count, "several") if rng.random() < 0.7 else \
        ["some", "several", "a few"][int(rng.integers(3))]
    return f"{word} {plural}"


def make_caption(rng: np.random.Generator, mentioned: dict[str, int]) -> str:
    """A sentence naming exactly the classes of ``mentioned`` (name -> count), in random order."""
    if not mentioned:
        text = EMPTY[int(rng.integers(len(EMPTY)))]
    else:
        names = list(mentioned)
        rng.shuffle(names)
        phrases = [_noun_phrase(rng, n, mentioned[n]) for n in names]
        x = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        text = template.format(x=x, X=x[0].upper() + x[1:],
                               place=PLACES[int(rng.integers(len(PLACES)))])
    if rng.random() < 0.25:
        text = text.rstrip(".!") + " " + TRAPS[int(rng.integers(len(TRAPS)))] + "."
    return text


def noisy_mentions(rng: np.random.Generator, counts: dict[str, int], classes: Sequence[str],
                   miss_rate: float, spurious_rate: float) -> dict[str, int]:
    """Web-caption noise: drop each present class with miss_rate; name an absent one with
    spurious_rate (the paper's Fig. 2: sentences miss objects and name absent ones)."""
    kept = {c: n for c, n in counts.items() if rng.random() >= miss_rate}
    absent = [c for c in classes[1:] if c not in counts]
    if absent and rng.random() < spurious_rate:
        kept[absent[int(rng.integers(len(absent)))]] = int(rng.choice([1, 1, 2]))
    return kept


# ---------------------------------------------------------------------------- writing -------

@dataclass
class SynthConfig:
    seed: int = 0
    n_labelled: int = 30
    n_tagged: int = 400
    n_test: int = 100
    min_size: int = 48
    max_size: int = 96
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    miss_rate: float = 0.25
    spurious_rate: float = 0.15
    jpeg_quality: int = 90
    difficulty: str = "medium"

    def check(self) -> None:
        unknown = [c for c in self.classes[1:] if c not in SHAPES]
        if not self.classes or self.classes[0] != "background" or unknown or \
                len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise UsageError(f"synthetic classes must be 'background' then some of "
                             f"{', '.join(SHAPES)}")
        if not 8 <= self.min_size <= self.max_size:
            raise UsageError("image sizes must satisfy 8 <= min size <= max size")
        if not (0 <= self.miss_rate <= 1 and 0 <= self.spurious_rate <= 1):
            raise UsageError("the miss and spurious rates must be in [0, 1]")
        if self.difficulty not in DIFFICULTIES:
            raise UsageError(f"unknown difficulty {self.difficulty!r}: choose one of "
                             f"{', '.join(DIFFICULTIES)}")
        if min(self.n_labelled, self.n_tagged, self.n_test) < 0:
            raise UsageError("image counts must be >= 0")


PARTS = {"labelled": 0, "tagged": 1, "test": 2}
PREFIX = {"labelled": "lab", "tagged": "web", "test": "test"}


def _jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    atomic_write(path, lambda f: f.write(buf.getvalue()), durable=False)


def _scene(cfg: SynthConfig, part: str, i: int) -> tuple[np.random.Generator, Scene]:
    rng = np.random.default_rng([cfg.seed, PARTS[part], i])
    size = (int(rng.integers(cfg.min_size, cfg.max_size + 1)),
            int(rng.integers(cfg.min_size, cfg.max_size + 1)))
    return rng, render_scene(rng, cfg.classes, size, cfg.difficulty)


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "benchmark.json").is_file():
        raise UsageError(f"{out} is not empty and holds no earlier benchmark (benchmark.json): "
                         "choose a new folder")
    if not overwrite:
        raise UsageError(f"{out} already holds a benchmark: pass --force (overwrite=True) to "
                         "replace it")
    # Remove only what the generator writes, so stale images of a larger run cannot linger.
    for name in ("VOCdevkit", "idw", "manifests"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("classes.txt", "benchmark.json"):
        (out / name).unlink(missing_ok=True)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def generate_benchmark(out_dir: str | Path, seed: int = 0, n_labelled: int = 30,
                       n_tagged: int = 400, n_test: int = 100, min_size: int = 48,
                       max_size: int = 96, classes: Sequence[str] | None = None,
                       miss_rate: float = 0.25, spurious_rate: float = 0.15,
                       jpeg_quality: int = 90, difficulty: str = "medium",
                       manifests: bool = True,
                       overwrite: bool = False,
                       progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the benchmark under ``out_dir``; returns its paths and measured statistics.

    ``out_dir`` must be new or empty; ``overwrite=True`` replaces an earlier benchmark there
    (recognised by its ``benchmark.json``), never another folder's contents.
    """
    cfg = SynthConfig(seed, n_labelled, n_tagged, n_test, min_size, max_size,
                      list(classes) if classes is not None else list(DEFAULT_CLASSES),
                      miss_rate, spurious_rate, jpeg_quality, difficulty)
    cfg.check()
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    voc = out / "VOCdevkit" / "VOC2012"
    idw = out / "idw"
    split_ids: dict[str, list[str]] = {"labelled": [], "test": []}
    for part in ("labelled", "test"):
        for i in range(getattr(cfg, f"n_{part}")):
            _, scene = _scene(cfg, part, i)
            image_id = f"{PREFIX[part]}_{i:04d}"
            _jpeg(voc / "JPEGImages" / f"{image_id}.jpg", scene.image, cfg.jpeg_quality)
            write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", scene.labelmap)
            split_ids[part].append(image_id)
            if progress:
                progress()
    seg = voc / "ImageSets" / "Segmentation"
    write_text(seg / "train.txt", "".join(f"{i}\n" for i in split_ids["labelled"]))
    write_text(seg / "val.txt", "".join(f"{i}\n" for i in split_ids["test"]))

    captions, truth = [], []
    tp = fp = fn = 0
    for i in range(cfg.n_tagged):
        rng, scene = _scene(cfg, "tagged", i)
        image_id = f"web_{i:04d}"
        _jpeg(idw / "images" / f"{image_id}.jpg", scene.image, cfg.jpeg_quality)
        write_palette_png(idw / "labels" / f"{image_id}.png", scene.labelmap)
        mentioned = noisy_mentions(rng, scene.counts, cfg.classes, cfg.miss_rate,
                                   cfg.spurious_rate)
        caption = make_caption(rng, mentioned)
        parsed = parse_caption(caption, cfg.classes)
        expected = [c for c in cfg.classes if c in mentioned]
        if parsed != expected:  # a template/lexicon mismatch would silently change the noise
            raise AssertionError(f"caption {caption!r} parses as {parsed}, not {expected}")
        true_tags = [c for c in cfg.classes if c in scene.counts]
        tp += len(set(parsed) & set(true_tags))
        fp += len(set(parsed) - set(true_tags))
        fn += len(set(true_tags) - set(parsed))
        captions.append({"image": f"images/{image_id}.jpg", "caption": caption})
        truth.append({"id": image_id, "tags": true_tags})
        if progress:
            progress()
    write_text(idw / "captions.jsonl", _jsonl(captions))
    write_text(idw / "true_tags.jsonl", _jsonl(truth))
    write_text(out / "classes.txt", "".join(f"{c}\n" for c in cfg.classes))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    stats = {"caption_tag_precision": round(precision, 4), "caption_tag_recall": round(recall, 4),
             "caption_tag_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4)}
    write_text(out / "benchmark.json", json.dumps({"format": "dis-synth", "version": 1,
                                                   "config": asdict(cfg), "stats": stats},
                                                  indent=2) + "\n")
    result: dict[str, Any] = {
        "out": str(out), "voc": str(voc), "classes_file": str(out / "classes.txt"),
        "captions": str(idw / "captions.jsonl"), "true_tags": str(idw / "true_tags.jsonl"),
        "true_labels": str(idw / "labels"), "config": asdict(cfg), "stats": stats}
    if manifests:
        result["manifests"] = write_benchmark_manifests(out)
    return result


def oracle_manifest(bench_dir: str | Path) -> Manifest:
    """The tagged images with their *true* labelmaps and tags: for the fully supervised bound
    and for measuring tag cleaning, never for training a semi-supervised run."""
    bench = Path(bench_dir)
    classes = parse_classes(str(bench / "classes.txt"))
    records = []
    for line in read_text(bench / "idw" / "true_tags.jsonl").splitlines():
        row = json.loads(line)
        records.append(Record(id=row["id"], image=f"images/{row['id']}.jpg",
                              labelmap=f"labels/{row['id']}.png", tags=row["tags"],
                              tag_source="pixels", split="tagged_oracle"))
    return Manifest(classes, records, bench / "idw")


def write_benchmark_manifests(bench_dir: str | Path) -> dict[str, str]:
    """Run the real preparation on the benchmark: ``manifests/train.jsonl`` (pixel-labelled),
    ``val.jsonl`` (test), ``tagged.jsonl`` (caption tags) and ``tagged_oracle.jsonl``."""
    bench = Path(bench_dir)
    mdir = bench / "manifests"
    classes = parse_classes(str(bench / "classes.txt"))
    report = prepare_voc(bench / "VOCdevkit", mdir, classes=classes)
    paths = {name: m["path"] for name, m in report["manifests"].items()}
    prepare_idw(bench / "idw" / "captions.jsonl", mdir / "tagged.jsonl", classes=classes,
                split="tagged")
    write_manifest(mdir / "tagged_oracle.jsonl", oracle_manifest(bench))
    paths.update(tagged=str(mdir / "tagged.jsonl"),
                 tagged_oracle=str(mdir / "tagged_oracle.jsonl"))
    return paths
