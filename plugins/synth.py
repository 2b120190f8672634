"""`dis synth`: write the seeded synthetic benchmark (VOC-format labelled/test part, captions)."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins import options as opt
from dis_plugins.options import json_option
from discli.cli.output import err_console, print_json


def synth(
    out: Path = typer.Argument(..., help="Output folder (new or empty; or an earlier "
                                         "benchmark with --overwrite)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    n_labelled: int = typer.Option(30, "--n-labelled", help="Pixel-labelled training images."),
    n_tagged: int = typer.Option(400, "--n-tagged", help="Images with noisy captions only."),
    n_test: int = typer.Option(100, "--n-test", help="Test images (labelled)."),
    n_dev: int = typer.Option(100, "--n-dev", help="Validation images (labelled; "
                              "manifests/dev.jsonl): choose settings on these, report the test "
                              "images once."),
    min_size: int = typer.Option(48, "--min-size", help="Smallest image side in pixels."),
    max_size: int = typer.Option(96, "--max-size", help="Largest image side in pixels."),
    classes: str | None = typer.Option(None, "--classes", help="Comma list of object classes "
                                       "among aeroplane, bird, boat, car, cat (default: all)."),
    miss_rate: float = typer.Option(0.25, "--miss-rate", help="Probability that a caption "
                                    "leaves a present class unmentioned."),
    spurious_rate: float = typer.Option(0.15, "--spurious-rate", help="Probability that a "
                                        "caption names one absent class."),
    difficulty: str = typer.Option("medium", "--difficulty", help="Scene clutter and how "
                                   "much colour tells the class: bold (the demo's, with "
                                   "--min-size 72 --max-size 120), vivid, clear, easy, medium "
                                   "or hard."),
    manifests: bool = typer.Option(True, "--manifests/--no-manifests", help="Also run "
                                   "prepare-voc and prepare-idw into OUT/manifests/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier benchmark in "
                                   "OUT."),
    force: bool = typer.Option(False, "--force", hidden=True),  # the older spelling
    json_out: bool = json_option("Print paths and statistics as JSON."),
    quiet: bool = opt.NoProgressOpt,
) -> None:
    """Generate the synthetic benchmark: a fair miniature of VOC + IDW, in their formats."""
    from dis_plugins._render import reporter
    from discli.data.manifest import parse_classes
    from discli.synth import DEFAULT_CLASSES, SynthConfig, generate_benchmark

    cfg = SynthConfig(seed=seed, n_labelled=n_labelled, n_tagged=n_tagged, n_test=n_test,
                      n_dev=n_dev, min_size=min_size, max_size=max_size,
                      classes=parse_classes(classes) if classes else DEFAULT_CLASSES,
                      miss_rate=miss_rate, spurious_rate=spurious_rate, difficulty=difficulty)
    with reporter(quiet) as rep:
        rep.start("synth", total=n_labelled + n_tagged + n_test + n_dev)
        result = generate_benchmark(out, cfg, manifests=manifests,
                                    overwrite=overwrite or force, progress=rep.advance)
    if json_out:
        print_json(result)
        return
    stats = result["stats"]
    err_console.print(
        f"wrote {n_labelled} labelled, {n_tagged} tagged, {n_dev} validation and {n_test} test "
        f"images to {out}\n"
        f"caption tags vs truth: precision {stats['caption_tag_precision']:.2f}, recall "
        f"{stats['caption_tag_recall']:.2f}, F1 {stats['caption_tag_f1']:.2f}",
        markup=False, highlight=False)
    for name, path in result.get("manifests", {}).items():
        err_console.print(f"  {name:14s} {path}", markup=False, highlight=False)
