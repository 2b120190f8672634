"""Pseudo-labels as files a person can look at: ``dis clean-tags export CACHE -o DIR``.

Written into ``DIR`` for a pseudo-label cache (:mod:`discli.pseudo.cache`):

- ``<id>.png`` per image: its pseudo-labelmap as a VOC palette PNG (the palette index is the
  class), with the pixels an M-step would not train on set to 255 (void, drawn in VOC's
  near-white void colour): those the E-step already ignored, those below ``confidence`` and,
  with ``gate`` (``noisy``: the caption's tags, ``cleaned``: the cleaned tags), those of a class
  the gate's tags say is absent; an id with "/" gets sub-folders;
- ``tags.jsonl``: one line per image, the ``clean-tags export`` JSON lines (``id``, ``noisy``,
  ``cleaned``, ``probs``) plus ``labelmap`` (the PNG, relative to DIR) and ``ignored`` (the
  share of its pixels set to 255).

What a run's M-step trained on (its rule, ``confidence`` and ``tag_gate`` as defaults) is
:func:`discli.train.clean.export_run_cache`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from discli.errors import UsageError
from discli.pseudo.tags import GATES, TagRule

TAGS_FILE = "tags.jsonl"


def export_cache(cache_path: str | Path, out_dir: str | Path, rule: TagRule,
                 confidence: float = 0.0, gate: str = "none") -> dict[str, Any]:
    """Write the cache's labelmaps and tags into ``out_dir`` (see the module docstring), the
    cleaned tags made by ``rule``; returns ``{"out", "tags", "images", "confidence", "gate",
    "ignored_share"}``."""
    from discli.storage import atomic_write
    from discli.data.labelmap import IGNORE, write_palette_png
    from discli.infer.inputs import safe_join
    from discli.pseudo.tags import apply_gate, entry_rows, open_cache, row_dict

    cache_path, out = Path(cache_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file: give a folder for the labelmaps")
    cache = open_cache(cache_path)
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
            labelmap = apply_gate(labelmap, gate, row.noisy, row.cleaned)
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
