"""Does the dual loop pay off, and does training-time inference? The preset's baseline, then
fine-tuning at several t_tr with any fine-tuning settings changed, on one synthetic benchmark.
Prints one JSON line: mIoU on the validation images (``--eval dev``, the default: choose settings
here) or the test images (``--eval test``: report once, afterwards), the t_tr = 30 - t_tr = 0
difference, and per round the pseudo-label mIoU (against the tagged images' true labelmaps) and
the tag F1 of the captions and of the cleaned tags (against their true tags):

    python benchmarks/dual_loop.py --difficulty bold --seed 2 --n-labelled 20 --t-tr 0,30 \\
        --set tag_rule=\\"evidence\\" --out /tmp/dual >> study.jsonl
    python benchmarks/dual_loop.py --summary study.jsonl
    python benchmarks/dual_loop.py --difficulty bold --seed 2 --n-labelled 20 --out /tmp/dual \\
        --score-finished --eval test        # every finished run on the test images, once
    python benchmarks/dual_loop.py --difficulty bold --seed 2 --n-labelled 20 --out /tmp/dual \\
        --oracle tags >> oracle.jsonl       # the true tags in place of the captions
    python benchmarks/dual_loop.py --difficulty bold --seed 2 --n-labelled 20 --out /tmp/dual \\
        --oracle pixels --t-tr 0 >> oracle.jsonl   # every batch from true labelmaps

The oracle ablations go through the same fine-tuning and say how much each lever can give at
most: ``tags`` trains and infers with the tagged images' true tags (``tagged_truetags.jsonl``),
``pixels`` draws every M-step batch from the true labelmaps of the labelled and the tagged
images (``bound.jsonl``, ``tagged_ratio = 0``: the bound's data with the fine-tuning
schedule; its E-steps still run and are not used, so one t_tr is enough).

The benchmark and the baseline are made once per (difficulty, seed, n-labelled) under --out and
reused by later runs with other --set values; each variant trains into its own folder, and a
finished one is only evaluated again. ``--summary`` prints a table of JSON-line files, one row
per benchmark and variant, with the means over benchmarks. One thread: the tiny model's
convolutions do not split over threads; two studies can run side by side on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from dis_plugins.options import parse_sets
from discli.pseudo.cache import PseudoCache
from discli.infer.checkpoint import inference_config, inference_settings, load_model
from discli.data.manifest import read_manifest, write_manifest
from discli.evaluation.evaluate import Scoring, evaluate
from discli.infer.settings import parse_steps
from discli.pseudo.stats import score_cache
from discli.synth import SynthConfig, bound_manifest, generate_benchmark
from discli.pseudo.tags import read_truth, tag_stats
from discli.train.config import load_config
from discli.train.finetune import finetune
from discli.train.pretrain import pretrain


def test_miou(checkpoint: Path, images: object, steps: list[int]) -> dict[str, float]:
    model, state = load_model(checkpoint)
    report = evaluate(model, images, Scoring(steps=steps, ensemble=False),
                      inference_config(inference_settings(state, checkpoint)))
    return {s["name"]: round(100 * s["miou"], 1) for s in report["setups"]}


def round_scores(cache_path: Path, oracle: object, truth: dict[str, set[str]], cfg: object
                 ) -> dict[str, float]:
    """Pseudo-label mIoU and tag F1 (captions, cleaned by the run's rule) of one E-step."""
    cache = PseudoCache(cache_path)
    try:
        pixels = score_cache(cache, oracle, cfg.confidence)["all"]["miou"]
        tags = tag_stats(cache, truth, cfg.tag_cleaning())
    finally:
        cache.close()
    return {"pseudo_miou": round(100 * pixels, 1),
            "caption_f1": round(100 * tags["noisy"]["micro"]["f1"], 1),
            "cleaned_f1": round(100 * tags["cleaned"]["micro"]["f1"], 1)}


def bench_root(args: argparse.Namespace) -> Path:
    """The folder of one benchmark's study: its data, baseline and every variant's runs."""
    return Path(args.out) / (f"{args.difficulty}-s{args.seed}-l{args.n_labelled}"
                             f"-t{args.n_tagged}-px{args.min_size}-{args.max_size}")


def oracle_manifests(mdir: Path) -> dict[str, Path]:
    """The oracle ablations' data, from the benchmark's hidden truth: ``tagged_truetags.jsonl``
    (the tagged images with their true tags in place of the captions' and no labelmaps) and
    ``bound.jsonl`` (the labelled images and the tagged ones with their true labelmaps: the
    bound's data, :func:`discli.synth.bound_manifest`)."""
    oracle = read_manifest(mdir / "tagged_oracle.jsonl")
    true_tags = [replace(r, labelmap=None, tag_source="manual", split="tagged")
                 for r in oracle.records]
    write_manifest(mdir / "tagged_truetags.jsonl", replace(oracle, records=true_tags))
    return {"tags": mdir / "tagged_truetags.jsonl", "pixels": bound_manifest(mdir.parent)}


def oracle_overrides(oracle: str | None, m: dict[str, Path]) -> dict[str, object]:
    """Fine-tuning keys of an oracle ablation, through the same M-step: ``tags``, the true tags
    in place of the captions; ``pixels``, every M-step batch from the true labelmaps of the
    labelled and the tagged images (the bound's data with the fine-tuning schedule)."""
    if oracle is None:
        return {}
    paths = oracle_manifests(m["train"].parent)
    if oracle == "tags":
        return {"tagged": str(paths["tags"])}
    return {"labelled": str(paths["pixels"]), "tagged_ratio": 0.0}


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(1)
    sets = parse_sets(args.sets)
    root = bench_root(args)
    bench = root / "bench"
    if not (bench / "manifests" / "dev.jsonl").exists():
        generate_benchmark(bench, SynthConfig(
            seed=args.seed, n_labelled=args.n_labelled, n_tagged=args.n_tagged,
            n_dev=args.n_dev, min_size=args.min_size, max_size=args.max_size,
            difficulty=args.difficulty), overwrite=True)
    m = {name: bench / "manifests" / f"{name}.jsonl"
         for name in ("train", "val", "dev", "tagged", "tagged_oracle")}
    images = read_manifest(m["dev" if args.eval == "dev" else "val"])
    oracle = read_manifest(m["tagged_oracle"])
    truth = read_truth(bench / "idw" / "true_tags.jsonl", oracle.classes)
    steps = parse_steps(args.t_ts)
    tic = time.perf_counter()
    base_cfg = load_config(args.preset, {"out": str(root / "baseline"), "labelled": str(m["train"]),
                                         "seed": args.seed}, section="pretrain")
    pretrain(base_cfg)
    baseline = root / "baseline" / "pretrain" / "final.pth"
    result: dict[str, object] = {"difficulty": args.difficulty, "seed": args.seed,
                                 "n_labelled": args.n_labelled, "eval": args.eval,
                                 "set": args.sets, "preset": args.preset,
                                 "baseline": test_miou(baseline, images, steps)}
    tag = "-".join(sorted(args.sets)).replace("/", "_").replace('"', "") or "preset"
    if args.preset != "demo":
        tag = f"{Path(args.preset).stem}-{tag}"
    if args.oracle:
        tag = f"oracle_{args.oracle}-{tag}"
        result["oracle"] = args.oracle
    oracle_keys = oracle_overrides(args.oracle, m)
    for t in parse_steps(args.t_tr):
        out = root / f"t{t}-{tag}"
        keys = {"out": str(out), "init": str(baseline), "t_tr": t, "labelled": str(m["train"]),
                "tagged": str(m["tagged"]), "seed": args.seed, **sets, **oracle_keys}
        cfg = load_config(args.preset, keys, section="finetune")
        finetune(cfg)
        rounds = [round_scores(out / "finetune" / f"round-{r}" / "cache.h5", oracle, truth, cfg)
                  for r in range(1, cfg.rounds + 1)]
        result[f"t_tr={t}"] = {"miou": test_miou(out / "finetune" / "final.pth", images, steps),
                               "rounds": rounds}
    if "t_tr=0" in result and "t_tr=30" in result:
        result["t30_minus_t0"] = {k: round(v - result["t_tr=0"]["miou"][k], 1)
                                  for k, v in result["t_tr=30"]["miou"].items()}
    result["seconds"] = round(time.perf_counter() - tic)
    return result


def score_finished(args: argparse.Namespace) -> None:
    """One JSON line per finished fine-tuning run of the benchmark (every variant folder with a
    ``final.pth``) and for the baseline, scored on ``--eval`` without training anything: how the
    test images are scored once, after the settings were chosen on the validation images."""
    torch.set_num_threads(1)
    root = bench_root(args)
    split = "dev" if args.eval == "dev" else "val"
    images = read_manifest(root / "bench" / "manifests" / f"{split}.jsonl")
    steps = parse_steps(args.t_ts)
    runs = {"baseline": root / "baseline" / "pretrain" / "final.pth",
            **{d.name: d / "finetune" / "final.pth" for d in sorted(root.glob("t*-*"))}}
    for name, checkpoint in runs.items():
        if checkpoint.exists():
            print(json.dumps({"benchmark": root.name, "run": name, "eval": args.eval,
                              "miou": test_miou(checkpoint, images, steps)}), flush=True)


def summary(paths: list[str]) -> None:
    """One row per benchmark and variant, then the means over benchmarks per variant."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines()
            if line.strip().startswith("{")]
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        oracle = f" oracle {r['oracle']}" if r.get("oracle") else ""
        by_variant[f"{r.get('preset', 'demo')}{oracle} {' '.join(r['set']) or '(preset)'} "
                   f"[{r.get('eval', 'test')}]"].append(r)
    for variant, rs in by_variant.items():
        print(f"\n## {variant}")
        print("| benchmark | baseline | t_tr=0 | t_tr=30 | 30-0 | tags caption / t0 / t30 "
              "(last round) | pseudo t0 / t30 (by round) |")
        print("|---|---|---|---|---|---|---|")
        diffs, gains0, gains30 = [], [], []
        for r in rs:
            t0, t30 = r.get("t_tr=0"), r.get("t_tr=30")
            name = f"{r['difficulty']} s{r['seed']} l{r['n_labelled']}"
            def at(x: dict | None) -> str:
                return "-" if x is None else f"{x['miou']['t=0']:.1f}"
            d = (t30["miou"]["t=0"] - t0["miou"]["t=0"]) if t0 and t30 else None
            if d is not None:
                diffs.append(d)
            tags = "-"
            if t0 and t30:
                last0, last30 = t0["rounds"][-1], t30["rounds"][-1]
                tags = (f"{last30['caption_f1']:.1f} / {last0['cleaned_f1']:.1f} / "
                        f"{last30['cleaned_f1']:.1f}")
                gains0.append(last0["cleaned_f1"] - last0["caption_f1"])
                gains30.append(last30["cleaned_f1"] - last30["caption_f1"])
            pseudo = " ; ".join("/".join(f"{x['pseudo_miou']:.1f}" for x in t["rounds"])
                                for t in (t0, t30) if t)
            print(f"| {name} | {r['baseline']['t=0']:.1f} | {at(t0)} | {at(t30)} | "
                  f"{'-' if d is None else f'{d:+.1f}'} | {tags} | {pseudo} |")
        if diffs:
            print(f"\nmean t_tr=30 - t_tr=0: {statistics.mean(diffs):+.2f} (min {min(diffs):+.1f}, "
                  f"{len(diffs)} benchmarks); cleaned - caption tag F1, last round: t_tr=0 "
                  f"{statistics.mean(gains0):+.1f}, t_tr=30 {statistics.mean(gains30):+.1f} "
                  f"(min {min(gains30):+.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--difficulty", default="bold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-labelled", type=int, default=20)
    parser.add_argument("--min-size", type=int, default=72, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=120, help="largest image side (px)")
    parser.add_argument("--n-tagged", type=int, default=400)
    parser.add_argument("--n-dev", type=int, default=100, help="validation images")
    parser.add_argument("--eval", choices=("dev", "test"), default="dev",
                        help="score on the validation (dev) or the test images")
    parser.add_argument("--t-tr", default="0,30")
    parser.add_argument("--t-ts", default="0,30")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="fine-tuning key=value (TOML syntax), repeatable")
    parser.add_argument("--oracle", choices=("tags", "pixels"),
                        help="oracle ablation: the tagged images' true tags in place of the "
                             "captions, or every M-step batch from true labelmaps")
    parser.add_argument("--out", default="dual-loop-study")
    parser.add_argument("--summary", nargs="+", metavar="JSONL",
                        help="print the table of earlier results instead of running")
    parser.add_argument("--score-finished", action="store_true",
                        help="only score the benchmark's finished runs on --eval (no training)")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if args.score_finished:
        score_finished(args)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
