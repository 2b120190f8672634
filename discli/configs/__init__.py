"""Shipped training presets: ``dis pretrain --config NAME`` / ``dis finetune --config NAME``.

Each preset is a TOML file beside this module (``NAME.toml``) in a layout
:func:`discli.train.config.load_config` reads (its module docstring describes them all), with
three tables: a shared ``[train]`` table (read by both commands), then ``[pretrain]`` and
``[finetune]`` command tables for the keys that differ between the two stages (e.g.
``loss_img``) or that only one stage uses. :func:`discli.train.config.load_config` takes a preset name wherever it takes a
config file path (a file of that name, when one exists, wins), applies ``[train]`` and then the
stage's table; the command line still overrides every key.

- ``demo``: what ``dis demo`` trains with on the synthetic benchmark (tiny backbone, AdamW,
  64 px crops);
- ``quick``: what ``dis demo --quick`` trains with (shorter schedules: a smoke run);
- ``voc-resnet101`` (also ``voc12-resnet101``): the paper's recipe on VOC12 + captions
  (ImageNet ResNet-101, SGD);
- ``photos``: real photos on a CPU or a small GPU (ImageNet MobileNetV3-Large at output
  stride 16, AdamW, 321 px crops; a starting point, untuned).
"""

from __future__ import annotations

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent

PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in _FOLDER.glob("*.toml")))
# other names of a preset
ALIASES = {"voc12-resnet101": "voc-resnet101"}


def preset_path(name: str) -> Path | None:
    """The file of the shipped preset ``name`` ("demo" or "demo.toml"), None if there is none."""
    stem = name[:-len(".toml")] if name.endswith(".toml") else name
    stem = ALIASES.get(stem, stem)
    if stem not in PRESETS:
        return None
    return _FOLDER / f"{stem}.toml"
