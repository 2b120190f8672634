"""`dis clean-tags` as a library: the noisy and cleaned tags of a pseudo-label cache.

A finetune cache (:mod:`discli.pseudo.cache`) holds, per image, the tags it came with
(``noisy_tags``), the tag probabilities after training-time inference (``tag_probs`` = sigmoid(v3))
and the pseudo-labelmap. The *cleaned* tags are what a :class:`TagRule` makes of them: ``threshold``
(the classes with probability >= ``threshold``, default 0.5: v3 alone) or ``evidence`` (the
caption corrected by the model's evidence: a caption tag is kept when its score is >= ``keep``,
a class the caption does not name is added when its score is >= ``add``; the score is the mean
of the tag probability and the class's share of the pseudo-labelmap, x10 and capped at 1, so
that a tenth of the image counts as sure). The evidence rule starts from the caption, so a weak
tag head cannot make the tags much worse than their input. Background (class 0) is present in
every image and is never listed as a tag.

Export formats (one line per image, cache order):

- ``jsonl``: ``{"id", "noisy": [names], "cleaned": [names], "probs": {name: p}}``
- ``csv`` / ``tsv``: header ``id,noisy,cleaned,p_<class>...``; tag lists joined with ``;``.

Ground-truth tag files for :func:`tag_stats` are JSON Lines ``{"id": ..., "tags": [names]}``.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from discli.pseudo.cache import PseudoCache
from discli.data.labelmap import IGNORE
from discli.errors import BadInputError, UsageError

FORMATS = ("jsonl", "csv", "tsv")
GATES = ("none", "noisy", "cleaned")  # which tags gate a pseudo-labelmap's classes (tag_gate)
DEFAULT_THRESHOLD = 0.5
LIST_SEP = ";"


@dataclass(frozen=True)
class TagRule:
    """How the cleaned tags of an image are made (module docstring)."""
    kind: str = "threshold"
    threshold: float = DEFAULT_THRESHOLD
    keep: float = 0.4
    add: float = 0.25

    def clean(self, noisy: np.ndarray, probs: np.ndarray, labelmap: np.ndarray | None
              ) -> np.ndarray:
        """The cleaned tags, bool (K,), of an image with caption tags ``noisy`` (K,), tag
        probabilities ``probs`` (K,) and pseudo-labelmap ``labelmap`` (255 = ignored)."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.kind == "threshold":
            return probs >= self.threshold
        if self.kind != "evidence":
            raise ValueError(f"tag rule must be one of {', '.join(TAG_RULES)}, got {self.kind!r}")
        if labelmap is None:
            raise ValueError("the evidence rule needs the pseudo-labelmap")
        k = len(probs)
        area = np.bincount(labelmap.ravel(), minlength=256)[:k] / max(labelmap.size, 1)
        score = evidence_score(probs, area)
        caption = np.asarray(noisy).astype(bool)
        return (caption & (score >= self.keep)) | (~caption & (score >= self.add))


TAG_RULES = ("threshold", "evidence")
AREA_SURE = 0.1  # share of the image at which a class's pixels count as full evidence


def area_evidence(area: np.ndarray) -> np.ndarray:
    """A class's share of the pseudo-labelmap as evidence in 0..1 (1 from ``AREA_SURE`` up)."""
    return np.minimum(np.asarray(area) / AREA_SURE, 1.0)


def evidence_score(probs: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The ``evidence`` rule's score: the mean of the tag probability and the area evidence
    (any shape: one image's (K,) or a study's (N, K))."""
    return 0.5 * np.asarray(probs) + 0.5 * area_evidence(area)


def threshold_rule(threshold: float = DEFAULT_THRESHOLD) -> TagRule:
    return TagRule("threshold", check_threshold(threshold))


def describe(rule: TagRule) -> dict[str, Any]:
    """The rule as the JSON of the commands reports it (and ``text``, as their tables do)."""
    if rule.kind == "threshold":
        return {"rule": "threshold", "threshold": rule.threshold,
                "text": f"threshold {rule.threshold:g}"}
    return {"rule": rule.kind, "keep": rule.keep, "add": rule.add,
            "text": f"{rule.kind} rule, keep {rule.keep:g}, add {rule.add:g}"}


def entry_tags(entry: Any, rule: TagRule) -> tuple[np.ndarray, np.ndarray]:
    """(caption tags, cleaned tags) of a cache entry, bool (K,), background set in both."""
    noisy = np.asarray(entry.noisy_tags).astype(bool)
    cleaned = rule.clean(noisy, entry.tag_probs, entry.labelmap)
    noisy[0] = cleaned[0] = True  # background is always there
    return noisy, cleaned


def apply_gate(labelmap: np.ndarray, tag_gate: str, noisy: np.ndarray, cleaned: np.ndarray
               ) -> np.ndarray:
    """``labelmap`` as a tag gate leaves it (:data:`GATES`): ``"none"`` as it is, ``"noisy"``
    and ``"cleaned"`` with the pixels of classes the caption's or the cleaned tags call absent
    set to ignore."""
    if tag_gate == "none":
        return labelmap
    return gate_labelmap(labelmap, cleaned if tag_gate == "cleaned" else noisy)


def gate_labelmap(labelmap: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``labelmap`` with the pixels of classes not in ``present`` (bool (K,)) set to ignore."""
    absent = ~present.astype(bool)
    absent[0] = False  # background is in every image
    lut = np.arange(256, dtype=np.uint8)
    lut[np.flatnonzero(absent)] = IGNORE
    return lut[labelmap]


@dataclass
class TagRow:
    id: str
    noisy: np.ndarray  # bool (K,)
    probs: np.ndarray  # float (K,)
    cleaned: np.ndarray  # bool (K,)


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"{{opt:threshold}} must be within 0..1, got {threshold}")
    return threshold


def open_cache(path: str | Path) -> PseudoCache:
    return PseudoCache(path)


def _row(entry: Any, rule: TagRule) -> TagRow:
    noisy, cleaned = entry_tags(entry, rule)
    return TagRow(entry.id, noisy, np.asarray(entry.tag_probs, dtype=np.float64), cleaned)


def as_rule(rule: TagRule | float) -> TagRule:
    """A rule, or a plain probability threshold (the ``--threshold`` of the commands)."""
    return rule if isinstance(rule, TagRule) else threshold_rule(rule)


def entry_rows(cache: PseudoCache, threshold: TagRule | float = DEFAULT_THRESHOLD
               ) -> Iterator[tuple[Any, TagRow]]:
    """(cache entry, its tag row) for every image, each entry read once; ``threshold``: the
    cleaning rule, or the probability threshold of :func:`threshold_rule`."""
    rule = as_rule(threshold)
    k = len(cache.classes)
    for entry in cache:
        if len(entry.tag_probs) != k:
            raise BadInputError(f"entry {entry.id!r} has {len(entry.tag_probs)} tag probabilities "
                                f"for {k} classes (corrupt cache?)", cache.path)
        yield entry, _row(entry, rule)


def rows(cache: PseudoCache, threshold: TagRule | float = DEFAULT_THRESHOLD
         ) -> Iterator[TagRow]:
    return (row for _, row in entry_rows(cache, threshold))


def names(mask: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [classes[k] for k in range(1, len(classes)) if mask[k]]


def row_dict(row: TagRow, classes: Sequence[str]) -> dict[str, Any]:
    return {"id": row.id, "noisy": names(row.noisy, classes),
            "cleaned": names(row.cleaned, classes),
            "probs": {classes[k]: round(float(row.probs[k]), 6) for k in range(1, len(classes))}}


def write_export(tag_rows: Iterable[TagRow], classes: Sequence[str], fmt: str = "jsonl",
                 stream: TextIO | None = None) -> int:
    """Write the rows in ``fmt`` (jsonl, csv, tsv); returns the number of rows written."""
    if fmt not in FORMATS:
        raise UsageError(f"{{opt:format}} must be one of {', '.join(FORMATS)}, not {fmt!r}")
    stream = stream or sys.stdout
    count = 0
    writer = None
    if fmt != "jsonl":
        writer = csv.writer(stream, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(["id", "noisy", "cleaned", *[f"p_{c}" for c in classes[1:]]])
    for row in tag_rows:
        data = row_dict(row, classes)
        if writer is None:
            stream.write(json.dumps(data) + "\n")
        else:
            writer.writerow([data["id"], LIST_SEP.join(data["noisy"]),
                             LIST_SEP.join(data["cleaned"]),
                             *[f"{data['probs'][c]:.6f}" for c in classes[1:]]])
        count += 1
    stream.flush()
    return count


def read_export(stream: TextIO, fmt: str = "jsonl") -> list[dict[str, Any]]:
    """Parse an export back into the ``jsonl`` dicts (for scripts and tests)."""
    if fmt == "jsonl":
        return [json.loads(line) for line in stream if line.strip()]
    reader = csv.DictReader(stream, delimiter="," if fmt == "csv" else "\t")
    out = []
    for rec in reader:
        split = lambda s: [x for x in s.split(LIST_SEP) if x]  # noqa: E731
        out.append({"id": rec["id"], "noisy": split(rec["noisy"]),
                    "cleaned": split(rec["cleaned"]),
                    "probs": {k[2:]: float(v) for k, v in rec.items() if k.startswith("p_")}})
    return out


def show(cache: PseudoCache, image_id: str, threshold: TagRule | float = DEFAULT_THRESHOLD
         ) -> dict[str, Any]:
    """One image: per class its noisy tag, probability and cleaned tag, plus what changed."""
    rule = as_rule(threshold)
    if image_id not in cache:
        raise BadInputError(f"no image with id {image_id!r} in the cache", cache.path)
    row = _row(cache.get(image_id), rule)
    classes = cache.classes
    added, removed = _changes(row, classes)
    return {**row_dict(row, classes), "added": added, "removed": removed,
            **describe(rule),
            "table": [{"class": classes[k], "noisy": bool(row.noisy[k]),
                       "prob": float(row.probs[k]), "cleaned": bool(row.cleaned[k])}
                      for k in range(1, len(classes))]}


def _changes(row: TagRow, classes: Sequence[str]) -> tuple[list[str], list[str]]:
    return names(row.cleaned & ~row.noisy, classes), names(row.noisy & ~row.cleaned, classes)


def diff(cache: PseudoCache, threshold: TagRule | float = DEFAULT_THRESHOLD,
         include_unchanged: bool = False) -> dict[str, Any]:
    """Tags added and removed by cleaning, per image and counted per class."""
    rule = as_rule(threshold)
    classes = cache.classes
    per_class = {c: {"added": 0, "removed": 0, "noisy": 0, "cleaned": 0} for c in classes[1:]}
    images = []
    total = 0
    for row in rows(cache, rule):
        total += 1
        added, removed = _changes(row, classes)
        for c in added:
            per_class[c]["added"] += 1
        for c in removed:
            per_class[c]["removed"] += 1
        for c in names(row.noisy, classes):
            per_class[c]["noisy"] += 1
        for c in names(row.cleaned, classes):
            per_class[c]["cleaned"] += 1
        if added or removed or include_unchanged:
            images.append({"id": row.id, "added": added, "removed": removed})
    return {"images": images, "per_class": per_class, "total_images": total,
            "changed_images": sum(1 for i in images if i["added"] or i["removed"]),
            "added": sum(v["added"] for v in per_class.values()),
            "removed": sum(v["removed"] for v in per_class.values()), **describe(rule)}


def read_truth(path: str | Path, classes: Sequence[str]) -> dict[str, set[str]]:
    """Ground-truth tags, JSON Lines ``{"id": ..., "tags": [names]}``, or a dis manifest (the
    tags of its records that are not from captions); ``-`` reads stdin."""
    from discli.data.fileio import json_loads, read_text

    known = set(classes[1:])
    truth: dict[str, set[str]] = {}
    text = read_text(path, "ground-truth tag file")
    if _manifest_header(text):
        return _manifest_truth(text, path, list(classes))
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json_loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"line {n}: malformed JSON ({exc.msg})", path) from None
        if (not isinstance(obj, dict) or not isinstance(obj.get("id"), str)
                or not isinstance(obj.get("tags"), list)):
            raise BadInputError(f'line {n}: expected {{"id": "...", "tags": [names]}}', path)
        unknown = [t for t in obj["tags"] if t not in known and t != classes[0]]
        if unknown:
            raise BadInputError(f"line {n}: unknown class(es) {unknown} (classes of the cache: "
                                f"{', '.join(classes[1:])})", path)
        if obj["id"] in truth:
            raise BadInputError(f"line {n}: duplicate id {obj['id']!r}", path)
        truth[obj["id"]] = {t for t in obj["tags"] if t != classes[0]}
    return truth


def _manifest_header(text: str) -> bool:
    from discli.data.fileio import json_loads
    from discli.data.manifest import FORMAT

    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        header = json_loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def _manifest_truth(text: str, path: str | Path, classes: list[str]) -> dict[str, set[str]]:
    """The tags of a manifest's records as ground truth: those from labelmaps or set by hand;
    caption tags are the noisy input being scored, never the truth. Its class list must be the
    cache's: a class it lacks would count as absent from every image."""
    from discli.data.manifest import parse_manifest

    name = "<stdin>" if str(path) == "-" else path
    manifest = parse_manifest(text, name, base=Path(str(path)).absolute().parent)
    if list(manifest.classes) != classes:
        raise BadInputError(f"classes {list(manifest.classes)} differ from the cache's "
                            f"{classes}", path)
    known = set(classes[1:])
    truth = {r.id: set(r.tags) for r in manifest.records if r.tag_source != "caption"}
    if not truth:
        raise BadInputError("every record's tags come from captions (tag_source caption): "
                            "not ground truth", path)
    unknown = sorted({t for tags in truth.values() for t in tags} - known)
    if unknown:
        raise BadInputError(f"unknown class(es) {unknown} (classes of the cache: "
                            f"{', '.join(sorted(known))})", path)
    return truth


def tag_stats(cache: PseudoCache, truth: dict[str, set[str]],
              threshold: TagRule | float = DEFAULT_THRESHOLD, truth_path: str | Path = "truth"
              ) -> dict[str, Any]:
    """Precision / recall / F1 (per class and micro) of the noisy and of the cleaned tags
    (cleaned by ``threshold``: a :class:`TagRule` or a probability threshold)."""
    classes = cache.classes
    rule = as_rule(threshold)
    noisy, cleaned, true = [], [], []
    missing = []
    for row in rows(cache, rule):
        if row.id not in truth:
            missing.append(row.id)
            continue
        noisy.append(row.noisy)
        cleaned.append(row.cleaned)
        true.append(np.array([k == 0 or c in truth[row.id] for k, c in enumerate(classes)]))
    if not true:
        raise BadInputError(f"no image of cache {cache.path} has ground-truth tags here",
                            truth_path)
    from discli.evaluation.metrics import tag_scores  # torch: keep this module light

    return {"images": len(true), "missing_truth": len(missing),
            "missing_examples": missing[:5], **describe(rule),
            "noisy": tag_scores(np.stack(noisy), np.stack(true), classes),
            "cleaned": tag_scores(np.stack(cleaned), np.stack(true), classes)}


def export_tags(cache_path: str | Path, output: str | Path = "-", fmt: str = "jsonl",
                threshold: TagRule | float = DEFAULT_THRESHOLD) -> int:
    """Write every image's tags (:func:`write_export`) to ``output``: ``"-"`` is stdout, a file
    is written atomically and may not be the cache itself. Returns the number of rows."""
    store = open_cache(cache_path)
    tag_rows = rows(store, threshold)
    if str(output) == "-":
        return write_export(tag_rows, store.classes, fmt)
    import io

    from discli.storage.safety import refuse_overlap
    from discli.storage import atomic_write

    refuse_overlap([(output, "export")], [(cache_path, "cache")],
                   advice="choose another {opt:output}")
    buffer = io.StringIO()
    count = write_export(tag_rows, store.classes, fmt, buffer)
    atomic_write(output, lambda f: f.write(buffer.getvalue().encode("utf-8")))
    return count
