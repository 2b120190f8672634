"""Writing the synthetic benchmark in the real formats (VOCdevkit, IDW captions, manifests)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from discli.data.captions import parse_caption
from discli.data.fileio import read_text, write_text
from discli.storage import atomic_write
from discli.data.idw import prepare_idw
from discli.data.manifest import (Manifest, Record, parse_classes, read_manifest,
                                  write_manifest)
from discli.data.prepare import prepare_voc, rebase
from discli.errors import UsageError
from discli.data.labelmap import write_palette_png
from discli.synth.looks import DIFFICULTIES
from discli.synth.shapes import DEFAULT_CLASSES, SHAPES
from discli.synth.scenes import Scene, render_scene
from discli.synth.captions import make_caption, noisy_mentions


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
    n_dev: int = 0  # validation images, for choosing settings without touching the test images

    def __post_init__(self) -> None:
        self.classes = list(self.classes)  # a copy: any sequence of names, the caller's kept

    def check(self) -> None:
        unknown = [c for c in self.classes[1:] if c not in SHAPES]
        if not self.classes or self.classes[0] != "background" or unknown or \
                len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise UsageError(f"synthetic classes must be 'background' then some of "
                             f"{', '.join(SHAPES)}")
        if not 8 <= self.min_size <= self.max_size:
            raise UsageError("image sizes must satisfy 8 <= {opt:min_size} <= {opt:max_size}")
        if not (0 <= self.miss_rate <= 1 and 0 <= self.spurious_rate <= 1):
            raise UsageError("the miss and spurious rates must be in [0, 1]")
        if self.difficulty not in DIFFICULTIES:
            raise UsageError(f"unknown difficulty {self.difficulty!r}: choose one of "
                             f"{', '.join(DIFFICULTIES)}")
        counts = (self.n_labelled, self.n_tagged, self.n_test, self.n_dev)
        if min(counts) < 0 or max(counts) > MAX_IMAGES:
            raise UsageError(f"image counts must be from 0 to {MAX_IMAGES}")
        if sum(counts) == 0:
            raise UsageError("nothing to write: every image count is 0")
        if not 0 <= self.seed < 2**63:
            raise UsageError("{opt:seed} must be an integer from 0 to 2**63 - 1")
        if self.max_size > MAX_SIZE:
            raise UsageError(f"{{opt:max_size}} must be at most {MAX_SIZE} pixels")


MAX_IMAGES = 10_000_000  # per part: a larger count is a typo that would run for days
MAX_SIZE = 4096  # pixels of an image side; VOC's are at most 500

PARTS = {"labelled": 0, "tagged": 1, "test": 2, "dev": 3}
PREFIX = {"labelled": "lab", "tagged": "web", "test": "test", "dev": "dev"}


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
        raise UsageError(f"{out} already holds a benchmark: pass {{opt:overwrite=True}} to "
                         "replace it")
    # Remove only what the generator writes, so stale images of a larger run cannot linger.
    for name in ("VOCdevkit", "idw", "manifests"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("classes.txt", "benchmark.json"):
        (out / name).unlink(missing_ok=True)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write_labelled(cfg: SynthConfig, voc: Path, progress: Callable[[], None] | None) -> None:
    """The pixel-labelled parts in the VOC layout: training (``train.txt``), test
    (``val.txt``) and validation (``dev.txt``, where there is one) images with labelmaps."""
    split_ids: dict[str, list[str]] = {"labelled": [], "test": [], "dev": []}
    for part in ("labelled", "test", "dev"):
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
    if split_ids["dev"]:
        write_text(seg / "dev.txt", "".join(f"{i}\n" for i in split_ids["dev"]))


def _tagged_image(cfg: SynthConfig, idw: Path, i: int) -> tuple[str, list[str], list[str]]:
    """Write tagged image ``i`` and its hidden true labelmap; returns its noisy caption, the
    tags read from that caption and the true tags."""
    rng, scene = _scene(cfg, "tagged", i)
    image_id = f"web_{i:04d}"
    _jpeg(idw / "images" / f"{image_id}.jpg", scene.image, cfg.jpeg_quality)
    write_palette_png(idw / "labels" / f"{image_id}.png", scene.labelmap)
    mentioned = noisy_mentions(rng, scene.counts, cfg.classes, cfg.miss_rate, cfg.spurious_rate)
    caption = make_caption(rng, mentioned)
    parsed = parse_caption(caption, cfg.classes)
    expected = [c for c in cfg.classes if c in mentioned]
    if parsed != expected:  # a template/lexicon mismatch would silently change the noise
        raise AssertionError(f"caption {caption!r} parses as {parsed}, not {expected}")
    return caption, parsed, [c for c in cfg.classes if c in scene.counts]


def _write_tagged(cfg: SynthConfig, idw: Path,
                  progress: Callable[[], None] | None) -> dict[str, float]:
    """The tagged part, IDW-style: images with captions (``captions.jsonl``) and the hidden
    truth (``true_tags.jsonl``, ``labels/``); returns how well the captions' tags match it."""
    captions, truth = [], []
    tp = fp = fn = 0
    for i in range(cfg.n_tagged):
        caption, parsed, true_tags = _tagged_image(cfg, idw, i)
        tp += len(set(parsed) & set(true_tags))
        fp += len(set(parsed) - set(true_tags))
        fn += len(set(true_tags) - set(parsed))
        captions.append({"image": f"images/web_{i:04d}.jpg", "caption": caption})
        truth.append({"id": f"web_{i:04d}", "tags": true_tags})
        if progress:
            progress()
    write_text(idw / "captions.jsonl", _jsonl(captions))
    write_text(idw / "true_tags.jsonl", _jsonl(truth))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {"caption_tag_precision": round(precision, 4), "caption_tag_recall": round(recall, 4),
            "caption_tag_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4)}


def generate_benchmark(out_dir: str | Path, cfg: SynthConfig | None = None, *,
                       manifests: bool = True, overwrite: bool = False,
                       progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the benchmark ``cfg`` describes (default: ``SynthConfig()``) under ``out_dir``;
    returns its paths and measured statistics.

    ``out_dir`` must be new or empty; ``overwrite=True`` replaces an earlier benchmark there
    (recognised by its ``benchmark.json``), never another folder's contents. ``cfg.n_dev`` > 0
    adds a validation split (``ImageSets/Segmentation/dev.txt``, ``manifests/dev.jsonl``) drawn
    from its own generators: the other images do not change with it. ``manifests=False`` skips
    the preparation into ``manifests/``; ``progress`` is called once per image written.
    """
    cfg = cfg if cfg is not None else SynthConfig()
    cfg.check()
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    voc = out / "VOCdevkit" / "VOC2012"
    idw = out / "idw"
    _write_labelled(cfg, voc, progress)
    stats = _write_tagged(cfg, idw, progress)
    write_text(out / "classes.txt", "".join(f"{c}\n" for c in cfg.classes))
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


def bound_manifest(bench_dir: str | Path) -> Path:
    """``manifests/bound.jsonl`` of a benchmark whose manifests are written: the pixel-labelled
    images and every tagged image with its true labelmap, the fully supervised bound's data
    (written once, paths relative to the benchmark folder)."""
    bench = Path(bench_dir)
    path = bench / "manifests" / "bound.jsonl"
    if not path.exists():
        train = read_manifest(bench / "manifests" / "train.jsonl")
        oracle = read_manifest(bench / "manifests" / "tagged_oracle.jsonl")
        records = (rebase(train.records, train.root, bench)
                   + rebase(oracle.records, oracle.root, bench))
        write_manifest(path, Manifest(train.classes, records, bench))
    return path


def write_benchmark_manifests(bench_dir: str | Path) -> dict[str, str]:
    """Run the real preparation on the benchmark: ``manifests/train.jsonl`` (pixel-labelled),
    ``val.jsonl`` (test), ``dev.jsonl`` (validation, where the benchmark has one),
    ``tagged.jsonl`` (caption tags) and ``tagged_oracle.jsonl``."""
    bench = Path(bench_dir)
    mdir = bench / "manifests"
    classes = parse_classes(str(bench / "classes.txt"))
    report = prepare_voc(bench / "VOCdevkit", mdir, classes=classes)
    paths = {name: m["path"] for name, m in report["manifests"].items()}
    prepare_idw(bench / "idw" / "captions.jsonl", mdir / "tagged.jsonl", classes=classes,
                split="tagged", allow_empty=True)  # a benchmark may have no tagged part
    write_manifest(mdir / "tagged_oracle.jsonl", oracle_manifest(bench))
    paths.update(tagged=str(mdir / "tagged.jsonl"),
                 tagged_oracle=str(mdir / "tagged_oracle.jsonl"))
    return paths
