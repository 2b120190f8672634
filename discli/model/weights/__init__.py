"""Pretrained backbone weights for the small backbones, made on a source set of other classes.

The paper starts from a ResNet-101 pretrained on ImageNet and COCO, whose classes are not VOC's
task but whose features (edges, parts, figure against ground) carry over. The ``tiny`` and
``small`` backbones have no such weights anywhere, so ``dis`` makes its own the same way: a
backbone is trained to segment a synthetic *source* set whose classes (bottle, chair, tvmonitor,
pottedplant, house, fish, umbrella, mushroom: :data:`discli.synth.SOURCE_CLASSES`) are
disjoint from the demo benchmark's, in any colour and texture, so that only shape tells them
apart. The shipped files are made by :func:`discli.train.ship_weights.make_weights` (``python -m
discli.train.ship_weights``: in the training wing, so that looking weights up imports no
training code), seeded
and reproducible, and load through the same ``--backbone-weights`` path as torchvision's
ImageNet weights: ``--backbone-weights shapes``.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
NAMES = ("shapes",)


def weights_file(backbone: str, channels: int, name: str = "shapes") -> Path:
    return WEIGHTS_DIR / f"{backbone}-c{channels}-{name}.pth"


def resolve(backbone: str, channels: int, name: str) -> Path | None:
    """The shipped file behind a weights name, or None when ``name`` is not a shipped name."""
    if name not in NAMES:
        return None
    return weights_file(backbone, channels, name)
