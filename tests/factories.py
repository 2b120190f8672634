"""The test suite's shared factories: tiny models and checkpoints, PNGs, labelled sets in the real
formats (images, palette PNG labelmaps, manifests) and pseudo-label caches.

Test files import what they need (``from factories import save_tiny, write_dataset``); module
fixtures built on these stay in the files that use them.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from discli.pseudo.cache import CacheEntry, CacheWriter, make_attrs
from discli.infer.checkpoint import save_checkpoint
from discli.data.dataset import normalize
from discli.data.manifest import Manifest, Record, write_manifest
from discli.data.labelmap import write_palette_png
from discli.model.losses import map_loss, tag_loss
from discli.model.net import ModelConfig, build_model

# the classes of the tiny checkpoints (test_infer_cli, test_bad_inputs, ...)
CLASSES = ["background", "cat", "dog"]
COLORS = {1: (230, 40, 40), 2: (40, 200, 60)}
# the classes of make_split's sets (training tests)
SPLIT_CLASSES = ["background", "aeroplane", "bird", "car"]
SPLIT_COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 220)}


# ----------------------------------------------------------------------------- models, checkpoints


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Autouse in every test module that imports it: these workloads are tiny, and one intra-op
    thread is several times faster than two on a busy 2-core machine (thread hand-offs
    dominate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(num_classes: int = len(CLASSES), channels: int = 8, seed: int = 0
               ) -> torch.nn.Module:
    """An untrained tiny DISNet in eval mode (seeded)."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="tiny", num_classes=num_classes,
                                   backbone_kwargs={"channels": channels})).eval()


def save_tiny(path: Path, model: torch.nn.Module, classes: Sequence[str] = CLASSES) -> Path:
    """A checkpoint of ``model`` as the commands read it (model, model_config, classes)."""
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                           "classes": list(classes)})
    return path


save_model = save_tiny


def make_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey noisy image with up to two coloured rectangles; labelmap = their classes."""
    image = rng.integers(90, 150, (h, w, 3)).astype(np.uint8)
    labelmap = np.zeros((h, w), np.uint8)
    for cls in (1, 2):
        if rng.random() < 0.6:
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            dy, dx = rng.integers(h // 4, h // 2 + 1), rng.integers(w // 4, w // 2 + 1)
            image[y:y + dy, x:x + dx] = np.clip(np.array(COLORS[cls]) + rng.integers(
                -20, 20, (min(dy, h - y), min(dx, w - x), 3)), 0, 255)
            labelmap[y:y + dy, x:x + dx] = cls
    return image, labelmap


def train_tiny(steps: int = 30, seed: int = 0) -> torch.nn.Module:
    """A tiny model (CLASSES) trained for a few seconds on make_sample images."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(ModelConfig(backbone="tiny", num_classes=len(CLASSES),
                                    backbone_kwargs={"channels": 16}))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        samples = [make_sample(rng, 32, 32) for _ in range(4)]
        x = torch.stack([normalize(img) for img, _ in samples])
        y = torch.stack([torch.from_numpy(lm).long() for _, lm in samples])
        tags = torch.stack([torch.tensor([1.0] + [float((lm == c).any()) for c in (1, 2)])
                            for _, lm in samples])
        out = model(x)
        loss = (map_loss(out["u3"], y) + tag_loss(out["v3"], tags)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_tiny() -> torch.nn.Module:  # trained once per test session, whichever file asks first
    return train_tiny()


# ----------------------------------------------------------------------------- image files

def noise_png(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    """A (w, h) = ``size`` image of seeded noise, converted to ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def solid_image(path: Path, size: tuple[int, int] = (20, 16),
                colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A one-colour RGB image of (w, h) = ``size`` (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 8x8 PNG whose IHDR then claims side x side pixels (CRC fixed)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


# ----------------------------------------------------------------------------- labelled sets

def write_dataset(root: Path, sizes: list[tuple[int, int]], seed: int = 1,
                  split: str = "val") -> Path:
    """make_sample images, labelmaps and a manifest (CLASSES) under ``root``; returns the
    manifest path."""
    rng = np.random.default_rng(seed)
    records = []
    for i, (h, w) in enumerate(sizes):
        image, labelmap = make_sample(rng, h, w)
        rid = f"img{i:03d}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{rid}.png")
        write_palette_png(root / "labels" / f"{rid}.png", labelmap)
        tags = [CLASSES[c] for c in (1, 2) if (labelmap == c).any()]
        records.append(Record(id=rid, image=f"images/{rid}.png", labelmap=f"labels/{rid}.png",
                              tags=tags, split=split))
    path = root / "manifest.jsonl"
    write_manifest(path, Manifest(classes=list(CLASSES), records=records, root=root))
    return path


def make_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with one or two flat rectangles of SPLIT_CLASSES; labelmap = their classes."""
    image = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
    labelmap = np.zeros((h, w), np.uint8)
    for cls in rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        dy, dx = rng.integers(8, 16), rng.integers(8, 16)
        labelmap[y:y + dy, x:x + dx] = cls
        image[y:y + dy, x:x + dx] = SPLIT_COLOURS[int(cls)]
    return image, labelmap


def make_split(root: Path, name: str, n: int, seed: int, labelled: bool, size=(40, 48),
               tag_source: str = "pixels") -> Path:
    """A set of ``n`` make_image images (SPLIT_CLASSES, two sizes) as ``root/<name>.jsonl``."""
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
        tags = sorted({SPLIT_CLASSES[c] for c in np.unique(labelmap) if c > 0})
        records.append(Record(id=rid, image=f"{name}/{rid}.png", labelmap=lm, tags=tags,
                              tag_source=tag_source, split=name))
    path = root / f"{name}.jsonl"
    write_manifest(path, Manifest(classes=SPLIT_CLASSES, records=records, root=root))
    return path


# ----------------------------------------------------------------------------- caches

def write_cache(path: Path, entries: Sequence[CacheEntry], classes: Sequence[str] = CLASSES,
                t_tr: int = 0, checkpoint_hash: str = "h",
                inference: dict[str, Any] | None = None) -> Path:
    """A finished pseudo-label cache holding ``entries``; returns its path."""
    writer = CacheWriter(path, make_attrs(list(classes), t_tr, checkpoint_hash, inference or {}))
    writer.write(list(entries))
    return writer.merge()
