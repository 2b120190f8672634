"""`dis score-cache`: how good are an E-step's pseudo-labels? Scores against true labelmaps."""

from __future__ import annotations

from pathlib import Path

import typer

from discli.cli.output import print_json


def score_cache(
    cache: Path = typer.Argument(..., help="Pseudo-label cache (round-N/cache.h5)."),
    truth: Path = typer.Argument(..., help="Manifest of the same images with their true "
                                 "labelmaps (e.g. a synthetic benchmark's "
                                 "manifests/tagged_oracle.jsonl)."),
    confidence: float | None = typer.Option(None, "--confidence", min=0.0, max=1.0,
                                            help="Also score only the pixels at or above this "
                                            "confidence (the ones an M-step with this "
                                            "threshold trains on).",
                                            show_default="the run's confidence from the "
                                            "config.toml beside round-N/, else 0"),
    root: Path | None = typer.Option(None, "--root", help="Override the manifest's root."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """mIoU and per-class IoU of a cache's pseudo-labelmaps (VOC protocol), over all pixels
    and over the confident ones, with the cache's own statistics (mean confidence, tags the
    E-step changed)."""
    from discli.cli.output import console, note
    from discli.cli.output import table as titled
    from discli.data.manifest import read_manifest
    from discli.train.clean import run_rule, run_settings

    truth_manifest = read_manifest(truth, root=root)  # before torch (pseudo_stats) is imported
    from discli.pseudo.stats import cache_stats
    from discli.pseudo.stats import score_cache as run_score
    from discli.pseudo.tags import open_cache

    pseudo = open_cache(cache)
    settings = run_settings(cache)
    if confidence is None:  # the pixels the run's own M-step trained on (as clean-tags export)
        confidence = float(settings.get("confidence", 0.0))
        record = Path(cache).absolute().parent.parent / "config.toml"  # run_settings' file
        source = (f"the run's, from {record}" if "confidence" in settings
                  else "the default: no run config.toml beside the cache")
    else:
        source = "--confidence"
    report = {"cache": str(cache), "truth": str(truth), "confidence": confidence,
              "confidence_from": source,
              **run_score(pseudo, truth_manifest, confidence),
              "stats": cache_stats(pseudo, confidence, run_rule(cache, settings=settings))}
    note(f"confidence {confidence:g} ({source})")  # after the scores: an error stays one line
    if json_out:
        print_json(report)
        return
    table = titled(title=f"{cache} ({report['images']} images)")
    for column in ("class", "IoU (all pixels)", f"IoU (confidence >= {confidence:g})"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def pct(value: float | None) -> str:
        return "-" if value is None or value != value else f"{100 * value:.1f}"

    for name in pseudo.classes:
        table.add_row(name, pct(report["all"]["iou"][name]), pct(report["kept"]["iou"][name]))
    table.add_section()
    table.add_row("mIoU", pct(report["all"]["miou"]), pct(report["kept"]["miou"]), style="bold")
    table.add_row("pixels kept", "100.0", pct(report["kept_share"]))
    console().print(table)
