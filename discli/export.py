"""Pseudo-labels as files a person can look at: ``dis clean-tags export CACHE -o DIR``.

Written into ``DIR`` for a pseudo-label cache (:mod:`discli.cache`):

- ``<id>.png`` per image: its pseudo-labelmap as a VOC palette PNG (the palette index is the
  class), with the pixels an M-step would not train on set to 255 (void, drawn in VOC's
  near-white void colour): those the E-step already ignored, those below ``confidence`` and,
  with ``gate`` (``noisy``: the caption's tags, ``cleaned``: the cleaned tags), those of a class
  the gate's tags say is absent; an id with "/" gets sub-folders;
- ``tags.jsonl``: one line per image, the ``clean-tags export`` JSON lines (``id``, ``noisy``,
  ``cleaned``, ``probs``) plus ``labelmap`` (the PNG, relative to DIR) and ``ignored`` (the
  share of its pixels set to 255).

``confidence`` and ``gate`` default to the run's own ``confidence`` and ``tag_gate`` when the
cache sits in a run folder (``<run>/finetune/round-N/cache.h5`` beside ``config.toml``), so the
PNGs show what that run's M-step trained on; otherwise to 0 and ``none`` (every labelled pixel).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from discli.errors import BadInputError, UsageError

GATES = ("none", "noisy", "cleaned")
TAGS_FILE = "tags.jsonl"


RUN_KEYS = ("confidence", "tag_gate", "tag_rule", "tag_threshold", "tag_keep", "tag_add")


def run_settings(cache_path: Path) -> dict[str, Any]:
    """``confidence``, ``tag_gate`` and the tag cleaning keys of the fine-tuning run a cache
    belongs to (``{}`` if the cache is not in a run folder)."""
    config = Path(cache_path).absolute().parent.parent / "config.toml"
    if not config.is_file():
        return {}
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"not a readable run configuration ({exc})", config) from None
    from discli.train.config import file_values  # every layout of a run's config.toml

    flat = file_values(data, "finetune")
    for table in ("train", "finetune"):
        flat.update(data.get(table, {}))
    return {k: flat[k] for k in RUN_KEYS if k in flat}


def run_rule(cache_path: str | Path, threshold: float | None = None) -> Any:
    """The :class:`discli.tags.TagRule` that made a cache's cleaned tags as its run's M-step
    saw them: a given probability ``threshold`` (the ``--threshold`` of ``dis clean-tags``)
    wins; else the run's ``tag_rule`` and its keys; a cache outside a run folder, or of a run
    that predates the rules, is cleaned at probability 0.5."""
    from discli.tags import TagRule, threshold_rule

    if threshold is not None:
        return threshold_rule(threshold)
    found = run_settings(Path(cache_path))
    default = TagRule()
    return TagRule(str(found.get("tag_rule", default.kind)),
                   float(found.get("tag_threshold", default.threshold)),
                   float(found.get("tag_keep", default.keep)),
                   float(found.get("tag_add", default.add)))


def export_cache(cache_path: str | Path, out_dir: str | Path, threshold: float | None = None,
                 confidence: float | None = None, gate: str | None = None) -> dict[str, Any]:
    """Write the cache's labelmaps and tags into ``out_dir`` (see the module docstring);
    returns ``{"out", "tags", "images", "confidence", "gate", "ignored_share"}``. The cleaned
    tags are the run's (:func:`run_rule`) unless a probability ``threshold`` is given."""
    from discli.storage import atomic_write
    from discli.data.voc import IGNORE, write_palette_png
    from discli.inputs import safe_join
    from discli.tags import entry_rows, open_cache, row_dict
    from discli.train.pseudo import gate_labelmap

    rule = run_rule(cache_path, threshold)
    cache_path, out = Path(cache_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file: give a folder for the labelmaps")
    cache = open_cache(cache_path)
    defaults = run_settings(cache_path)
    confidence = float(defaults.get("confidence", 0.0) if confidence is None else confidence)
    gate = str(defaults.get("tag_gate", "none") if gate is None else gate)
    if not 0.0 <= confidence <= 1.0:
        raise UsageError(f"{{opt:confidence}} must be within 0..1, got {confidence}")
    if gate not in GATES:
        raise UsageError(f"{{opt:gate}} must be one of {', '.join(GATES)}, not {gate!r}")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    ignored = pixels = 0
    try:
        for entry, row in entry_rows(cache, rule):
            labelmap = entry.labelmap.astype(np.uint8)  # a copy
            labelmap[entry.confidence.astype(np.float32) < confidence] = IGNORE
            if gate == "noisy":
                labelmap = gate_labelmap(labelmap, row.noisy)
            elif gate == "cleaned":
                labelmap = gate_labelmap(labelmap, row.cleaned)
            name = f"{row.id}.png"
            write_palette_png(safe_join(out, name), labelmap)
            void = int((labelmap == IGNORE).sum())
            ignored += void
            pixels += labelmap.size
            lines.append(json.dumps({**row_dict(row, cache.classes), "labelmap": name,
                                     "ignored": round(void / max(labelmap.size, 1), 6)}))
    finally:
        cache.close()
    text = "".join(line + "\n" for line in lines)
    atomic_write(out / TAGS_FILE, lambda f: f.write(text.encode("utf-8")))
    return {"out": str(out), "tags": str(out / TAGS_FILE), "images": len(lines),
            "confidence": confidence, "gate": gate,
            "ignored_share": ignored / max(pixels, 1)}
