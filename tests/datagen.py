"""Tiny generated datasets in the real formats (JPEG images, palette PNG labelmaps, manifests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from discli.data.manifest import Manifest, Record, write_manifest
from discli.data.voc import write_palette_png

CLASSES = ["background", "aeroplane", "bird", "car"]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 220)}


def make_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
    labelmap = np.zeros((h, w), np.uint8)
    for cls in rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        dy, dx = rng.integers(8, 16), rng.integers(8, 16)
        labelmap[y:y + dy, x:x + dx] = cls
        image[y:y + dy, x:x + dx] = COLOURS[int(cls)]
    return image, labelmap


def make_split(root: Path, name: str, n: int, seed: int, labelled: bool, size=(40, 48),
               tag_source: str = "pixels") -> Path:
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        h, w = size if i % 3 else (size[0] + 8, size[1])  # two sizes: exercises bucketing
        image, labelmap = make_image(rng, h, w)
        rid = f"{name}_{i:03d}"
        Image.fromarray(image).save(root / name / f"{rid}.png")
        lm = None
        if labelled:
            write_palette_png(root / name / f"{rid}_gt.png", labelmap)
            lm = f"{name}/{rid}_gt.png"
        tags = sorted({CLASSES[c] for c in np.unique(labelmap) if c > 0})
        records.append(Record(id=rid, image=f"{name}/{rid}.png", labelmap=lm, tags=tags,
                              tag_source=tag_source, split=name))
    path = root / f"{name}.jsonl"
    write_manifest(path, Manifest(classes=CLASSES, records=records, root=root))
    return path
