"""The dual loop's data path at the paper's scale: seconds per image and peak memory against N.

    python benchmarks/scale.py                      # N = 1000, 5000, 20000, 50000
    python benchmarks/scale.py --n 1000,5000        # a quicker look

The paper fine-tunes with 50k tagged images (40k IDW + 10k SBD). For each N this generates N small
tagged images (64 px JPEG, random shapes, tags in the manifest), then times, in a fresh process
so that its peak RSS is its own:

- E-step: ``run_estep`` with the tiny backbone at t_tr = 30 (reading the images, inference, its
  crash-safe part files and their merge into one cache),
- opening the finished cache (``PseudoCache``),
- building the pseudo-labelled dataset (``PseudoLabelled``: id check, thresholds),
- one pass of M-step data loading over every image (``DataLoader`` with the training transform,
  batch 16, no model).

Each stage's time is divided by N: the target (issue 17) is seconds per image and peak RSS both
flat within 20% from 1k to 50k. Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["background", "aeroplane", "bird", "boat", "car", "cat"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """N tagged 64x64 JPEGs with one or two coloured rectangles each, and their manifest."""
    from PIL import Image

    from discli.data.manifest import Manifest, Record, write_manifest

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image = rng.integers(80, 150, (64, 64, 3), dtype=np.uint8)
        tags = []
        for cls in rng.choice(np.arange(1, len(CLASSES)), size=rng.integers(1, 3), replace=False):
            y, x, h, w = rng.integers(0, 40, 2).tolist() + rng.integers(12, 24, 2).tolist()
            image[y:y + h, x:x + w] = (40 * cls) % 255
            tags.append(CLASSES[int(cls)])
        rid = f"web_{i:06d}"
        Image.fromarray(image).save(root / "img" / f"{rid}.jpg", quality=90)
        records.append(Record(id=rid, image=f"img/{rid}.jpg", tags=sorted(tags),
                              tag_source="caption", split="tagged"))
    path = root / "tagged.jsonl"
    write_manifest(path, Manifest(classes=CLASSES, records=records, root=root))
    return path


def measure(manifest_path: Path, workdir: Path, t_tr: int, batch: int) -> dict[str, float]:
    """Runs in its own process: every stage once, times per image and the peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from discli.pseudo.cache import PseudoCache
    from discli.data.dataset import collate, train_transform
    from discli.data.manifest import read_manifest
    from discli.infer.loop import InferenceConfig
    from discli.model.net import build_model
    from discli.train.estep import Execution, PseudoLabelling, run_estep
    from discli.train.keys import TrainConfig
    from discli.train.pseudo import PseudoLabelled

    torch.manual_seed(0)
    manifest = read_manifest(manifest_path)
    n = len(manifest.records)
    model = build_model(backbone="tiny", num_classes=len(CLASSES),
                        backbone_kwargs={"channels": 64}).eval()
    out: dict[str, float] = {"n": n, "rss_start_mb": peak_rss_mb()}

    cache_path = workdir / "cache.h5"
    tic = time.perf_counter()
    run_estep(model, manifest, cache_path,
              PseudoLabelling("scale-benchmark", t_tr, InferenceConfig(lr=0.003)),
              Execution(batch_size=batch))
    out["estep_s"] = time.perf_counter() - tic
    out["rss_after_estep_mb"] = peak_rss_mb()

    tic = time.perf_counter()
    cache = PseudoCache(cache_path)
    assert len(cache) == n
    out["open_cache_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    dataset = PseudoLabelled(manifest, cache, train_transform(64),
                             TrainConfig(confidence=0.7, mstep_tags="noisy", tag_gate="noisy"))
    out["build_dataset_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    seen = 0
    for item in DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate,
                           num_workers=0):
        seen += len(item["id"])
    assert seen == n
    out["mstep_load_s"] = time.perf_counter() - tic
    out["cache_mb"] = cache_path.stat().st_size / 2**20
    out["rss_peak_mb"] = peak_rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000,5000,20000,50000", help="numbers of tagged images")
    parser.add_argument("--t-tr", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="E-step batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.measure:
        result = measure(Path(args.measure[0]), Path(args.measure[1]), args.t_tr, args.batch)
        print(json.dumps(result))
        return

    from _common import describe_machine, load_note

    print(describe_machine(torch.device("cpu")))
    print(f"tiny backbone (64 channels), 64x64 JPEG, t_tr={args.t_tr}, E-step batch "
          f"{args.batch}, M-step loading batch 16, {args.threads} thread(s); each N in a fresh "
          "process")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="dis-scale-"))
    header = (f"{'N':>7} {'generate':>9} {'E-step':>9} {'open':>9} {'dataset':>9} "
              f"{'M-load':>9}   (ms/image)  {'peak RSS':>9} {'cache':>9}")
    rows = []
    for n in (int(x) for x in args.n.split(",")):
        root = base / f"n{n}"
        tic = time.perf_counter()
        manifest = root / "tagged.jsonl"
        reused = manifest.exists()  # a --workdir of an earlier run keeps its images
        if not reused:
            generate(root, n)
        gen_s = time.perf_counter() - tic
        (root / "cache.h5").unlink(missing_ok=True)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(manifest), str(root),
             "--t-tr", str(args.t_tr), "--batch", str(args.batch), "--threads",
             str(args.threads)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                 str(args.threads)})
        if child.returncode != 0:
            sys.exit(f"N={n}: measurement failed:\n{child.stderr[-3000:]}")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(r)
        if len(rows) == 1:
            print(header)
        ms = {k: 1000 * r[k] / n for k in ("estep_s", "open_cache_s", "build_dataset_s",
                                           "mstep_load_s")}
        gen = "reused" if reused else f"{1000 * gen_s / n:.3f}"
        print(f"{n:>7} {gen:>9} {ms['estep_s']:>9.3f} {ms['open_cache_s']:>9.4f} "
              f"{ms['build_dataset_s']:>9.4f} {ms['mstep_load_s']:>9.3f}   {'':10} "
              f"{r['rss_peak_mb']:>7.0f}MB {r['cache_mb']:>7.1f}MB", flush=True)
    first, last = rows[0], rows[-1]
    for key in ("estep_s", "mstep_load_s"):
        ratio = (last[key] / last["n"]) / (first[key] / first["n"])
        print(f"  {key[:-2]} per image at N={last['n']} / N={first['n']}: {ratio:.3f}")
    print(f"  peak RSS at N={last['n']} / N={first['n']}: "
          f"{last['rss_peak_mb'] / first['rss_peak_mb']:.3f}")
    print(load_note())


if __name__ == "__main__":
    main()
