"""Can a rule that combines the caption with the model's evidence clean tags better than v3?

For every cache (an E-step's ``cache.h5``) and the tagged images' true tags (the synthetic
benchmark's hidden ``idw/true_tags.jsonl``), a rule keeps a caption tag when its score is >= a
and adds a class the caption does not name when its score is >= b. Scores: ``P``, the cleaned
tag probability sigmoid(v3) after inference (``a = b = 0.5`` is what the E-step writes); ``A``,
the class's share of the pseudo-labelmap (x10, capped at 1: 10% of the image counts as sure);
``PA``, their mean. (a, b) is chosen on the --dev caches (best mean F1 gain over the captions)
and then applied unchanged to the --test caches. Prints one line per score:

    python benchmarks/tag_rules.py \\
        --dev RUN/finetune/round-2/cache.h5@BENCH/idw/true_tags.jsonl ... \\
        --test DEMO/runs/dis-t30/finetune/round-2/cache.h5@DEMO/bench/idw/true_tags.jsonl ...

This is the script behind the note on tag cleaning in docs/studies.md (no numbers of its own are
kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable

import numpy as np

from discli.pseudo.cache import PseudoCache
from discli.evaluation.metrics import tag_scores
from discli.pseudo.tags import area_evidence, evidence_score, read_truth

Arrays = dict[str, np.ndarray]


SCORES: dict[str, Callable[[Arrays], np.ndarray]] = {
    "P": lambda d: d["probs"],
    "A": lambda d: area_evidence(d["area"]),
    "PA": lambda d: evidence_score(d["probs"], d["area"]),  # the E-step's evidence rule
}


def load(spec: str) -> Arrays:
    """``CACHE@TRUE_TAGS`` -> per image and class (background included, never scored): probs,
    area, caption, truth; and the cache's classes."""
    cache_path, truth_path = spec.split("@")
    cache = PseudoCache(cache_path)
    classes = cache.classes
    truth = read_truth(truth_path, classes)
    rows: dict[str, list[np.ndarray]] = {"probs": [], "area": [], "caption": [], "truth": []}
    for entry in cache:
        rows["probs"].append(entry.tag_probs)
        rows["area"].append(np.bincount(entry.labelmap.ravel(), minlength=256)[:len(classes)]
                            / entry.labelmap.size)
        rows["caption"].append(entry.noisy_tags > 0)
        rows["truth"].append(np.array([c in truth[entry.id] for c in classes]))
    cache.close()
    return {**{k: np.array(v) for k, v in rows.items()}, "classes": np.array(classes)}


def f1(pred: np.ndarray, d: Arrays) -> float:
    """Micro F1 (%) of tags ``pred`` against the truth, background left out."""
    return 100 * tag_scores(pred, d["truth"], list(d["classes"]))["micro"]["f1"]


def gain(d: Arrays, score: np.ndarray, a: float, b: float) -> float:
    """F1 of the rule's tags minus F1 of the caption's."""
    cleaned = (d["caption"] & (score >= a)) | (~d["caption"] & (score >= b))
    return f1(cleaned, d) - f1(d["caption"], d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", nargs="+", required=True, help="CACHE@TRUE_TAGS to choose on")
    parser.add_argument("--test", nargs="*", default=[], help="CACHE@TRUE_TAGS to apply to")
    args = parser.parse_args()
    dev, test = [load(s) for s in args.dev], [load(s) for s in args.test]
    grid = np.round(np.arange(0.0, 1.001, 0.05), 2)
    for name, score in SCORES.items():
        dev_scored = [(d, score(d)) for d in dev]
        best = max(itertools.product(grid, grid),
                   key=lambda ab: np.mean([gain(d, sc, *ab) for d, sc in dev_scored]))
        dev_gains = [round(gain(d, sc, *best), 1) for d, sc in dev_scored]
        test_gains = [round(gain(d, score(d), *best), 1) for d in test]
        plain = [round(gain(d, d["probs"], 0.5, 0.5), 1) for d in test]
        print(json.dumps({"score": name, "a": float(best[0]), "b": float(best[1]),
                          "dev_mean_gain": round(float(np.mean(dev_gains)), 1),
                          "dev_gains": dev_gains, "test_gains": test_gains,
                          "test_gains_of_v3": plain}))


if __name__ == "__main__":
    main()
