"""Appearance of the synthetic benchmark: the shared colour palette, textures, class looks and
the difficulty levels (see :mod:`discli.synth`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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

# The "bold" level's looks: each class has one signature colour (aeroplane white, bird yellow,
# boat blue, car red, cat orange) and sometimes wears another class's, as a red boat or a white
# cat; the backgrounds keep to the muted colours, so that a small CNN can fit the fully
# supervised bound (see the module docstring of discli.synth) and what few labelled images
# miss is the atypical looks and the shapes.
SIGNATURE_LOOKS = {
    "aeroplane": Look({"white": 6, "grey": 1.5, "blue": 0.7, "red": 0.4},
                      {"gradient": 4, "flat": 3}),
    "bird": Look({"yellow": 6, "black": 1.5, "brown": 1, "white": 0.5}, {"spots": 4, "noise": 2}),
    "boat": Look({"blue": 6, "white": 1.2, "red": 1, "teal": 0.5}, {"stripes": 5, "flat": 1}),
    "car": Look({"red": 6, "black": 1.2, "grey": 1, "blue": 0.5}, {"gradient": 4, "flat": 2}),
    "cat": Look({"orange": 6, "brown": 1.5, "grey": 1, "black": 0.5}, {"stripes": 4, "noise": 3}),
}
SIGNATURE_BACKGROUND = Look({"green": 4, "teal": 2, "blue": 1, "grey": 3, "brown": 3,
                             "yellow": 0.5, "white": 0.5},
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
    objects: tuple[float, float, float] = (0.25, 0.4, 0.35)  # P(1, 2, 3 objects in an image)
    touch: float = 0.6  # probability that an object is placed against the previous one
    signature: bool = False  # SIGNATURE_LOOKS / SIGNATURE_BACKGROUND instead of LOOKS

    @property
    def looks(self) -> dict[str, Look]:
        return SIGNATURE_LOOKS if self.signature else LOOKS

    @property
    def background(self) -> Look:
        return SIGNATURE_BACKGROUND if self.signature else BACKGROUND_LOOK


# Measured with the demo's tiny backbone (see the module docstring): "hard" leaves even the
# fully supervised bound near 35 mIoU, too little room for semi-supervision to show anything.
DIFFICULTIES = {
    "clear": Difficulty((0, 1), 0.0, (0, 0), 0.0, 3.0, (0.25, 0.42)),
    "vivid": Difficulty((0, 1), 0.0, (0, 0), 0.0, 6.0, (0.25, 0.42)),
    "easy": Difficulty((0, 2), 0.0, (0, 0), 0.0, 2.0, (0.22, 0.4)),
    "medium": Difficulty((1, 3), 0.1, (0, 1), 0.15, 1.5, (0.25, 0.45)),
    "hard": Difficulty((2, 5), 0.25, (0, 2), 0.3, 1.0, (0.3, 0.55)),
    # Large objects (0.38-0.5 of the short side), one or two, rarely touching, signature looks
    # squared (a class wears its own colour about 92% of the time): the demo's level.
    "bold": Difficulty((0, 1), 0.0, (0, 0), 0.0, 2.0, (0.38, 0.5), (0.6, 0.4, 0.0), 0.1, True),
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
