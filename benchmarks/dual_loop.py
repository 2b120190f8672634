"""Does the dual loop pay off? The demo preset's baseline, then fine-tuning at several t_tr with
any fine-tuning settings changed, on one synthetic benchmark; prints test mIoU and the
pseudo-label mIoU of every round (against the tagged images' true labelmaps) as one JSON line.

    python benchmarks/dual_loop.py --difficulty bold --seed 2 --n-labelled 20 --t-tr 0,30 \\
        --set tagged_ratio=0.25 --out /tmp/dual

The benchmark and the baseline are made once per (difficulty, seed, n-labelled) under --out and
reused by later runs with other --set values; each variant trains into its own folder. This is
the script behind the README's study of the M-step (one thread: the tiny model's convolutions
do not split over threads; two studies can run side by side on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dis_plugins.train_options import parse_sets
from discli.cache import PseudoCache
from discli.checkpoint import inference_config, inference_settings, load_model
from discli.data.manifest import read_manifest
from discli.synth import generate_benchmark
from discli.evaluate import evaluate, parse_steps
from discli.pseudo_stats import score_cache
from discli.train.config import load_config
from discli.train.finetune import finetune
from discli.train.pretrain import pretrain


def test_miou(checkpoint: Path, val: object, steps: list[int]) -> dict[str, float]:
    model, state = load_model(checkpoint)
    report = evaluate(model, val, steps=steps, ensemble=False,
                      cfg=inference_config(inference_settings(state, checkpoint)))
    return {s["name"]: round(100 * s["miou"], 1) for s in report["setups"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--difficulty", default="bold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-labelled", type=int, default=20)
    parser.add_argument("--min-size", type=int, default=72, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=120, help="largest image side (px)")
    parser.add_argument("--n-tagged", type=int, default=400)
    parser.add_argument("--t-tr", default="0,30")
    parser.add_argument("--t-ts", default="0,30")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="fine-tuning key=value (TOML syntax), repeatable")
    parser.add_argument("--out", default="dual-loop-study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = parse_sets(args.sets)
    root = Path(args.out) / (f"{args.difficulty}-s{args.seed}-l{args.n_labelled}-t{args.n_tagged}"
                             f"-px{args.min_size}-{args.max_size}")
    bench = root / "bench"
    if not (bench / "benchmark.json").exists():
        generate_benchmark(bench, seed=args.seed, n_labelled=args.n_labelled,
                           n_tagged=args.n_tagged, min_size=args.min_size,
                           max_size=args.max_size, difficulty=args.difficulty, overwrite=True)
    m = {name: bench / "manifests" / f"{name}.jsonl"
         for name in ("train", "val", "tagged", "tagged_oracle")}
    val, oracle = read_manifest(m["val"]), read_manifest(m["tagged_oracle"])
    steps = parse_steps(args.t_ts)
    tic = time.perf_counter()
    base_cfg = load_config(args.preset, {"out": str(root / "baseline"), "labelled": str(m["train"]),
                                         "seed": args.seed}, section="pretrain")
    pretrain(base_cfg)
    baseline = root / "baseline" / "pretrain" / "final.pth"
    result: dict[str, object] = {"difficulty": args.difficulty, "seed": args.seed,
                                 "n_labelled": args.n_labelled, "set": args.sets,
                                 "baseline": test_miou(baseline, val, steps)}
    tag = "-".join(sorted(args.sets)).replace("/", "_") or "preset"
    for t in parse_steps(args.t_tr):
        out = root / f"t{t}-{tag}"
        cfg = load_config(args.preset, {"out": str(out), "init": str(baseline), "t_tr": t,
                                        "labelled": str(m["train"]), "tagged": str(m["tagged"]),
                                        "seed": args.seed, **sets}, section="finetune")
        finetune(cfg)
        pseudo = []
        for r in range(1, cfg.rounds + 1):
            cache = PseudoCache(out / "finetune" / f"round-{r}" / "cache.h5")
            pseudo.append(round(100 * score_cache(cache, oracle, cfg.confidence)["all"]["miou"],
                                1))
            cache.close()
        result[f"t_tr={t}"] = {"test": test_miou(out / "finetune" / "final.pth", val, steps),
                               "pseudo_label_miou_by_round": pseudo}
    result["seconds"] = round(time.perf_counter() - tic)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
