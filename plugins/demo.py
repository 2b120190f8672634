"""`dis demo`: generate the synthetic benchmark, train every setup of the ablation, report."""

from __future__ import annotations

from pathlib import Path

import typer

from dis_plugins.options import DEVICE_HELP, json_option, output_folder
from discli.cli.output import RichReporter, err_console, print_json


def demo(
    out: Path = typer.Option(Path("dis-demo"), "--out", "-o", parser=output_folder,
                             help="Folder for the benchmark, runs and the report (re-running "
                             "resumes)."),
    quick: bool = typer.Option(False, "--quick", help="A smoke run (the 'quick' preset, half "
                               "the tagged images) instead of the default ('demo' preset)."),
    t_tr: str = typer.Option("0,10,30", "--t-tr", help="Training-time inference iterations "
                             "to fine-tune with (comma list)."),
    t_ts: str = typer.Option("0,10,30", "--t-ts", help="Test-time inference iterations."),
    seed: int = typer.Option(0, "--seed"),
    difficulty: str = typer.Option("bold", "--difficulty", help="Benchmark difficulty: bold, "
                                   "vivid, clear, easy, medium or hard (see `dis synth "
                                   "--help`)."),
    n_labelled: int = typer.Option(20, "--n-labelled", min=1, help="Pixel-labelled images of "
                                   "the benchmark (the vivid study in docs/studies.md used 30)."),
    min_size: int = typer.Option(72, "--min-size", help="Smallest image side of the benchmark "
                                 "(pixels; the vivid study in docs/studies.md used 48)."),
    max_size: int = typer.Option(120, "--max-size", help="Largest image side of the benchmark "
                                 "(pixels; the vivid study used 96)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes that train the "
                                "fine-tuning runs and the bound side by side (0: one per CPU "
                                "core, at most 2; 1: one after the other, with progress bars)."),
    json_out: bool = json_option("Print report.json on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Reproduce the paper's ablation (Table 3, Fig. 5) on the built-in synthetic benchmark."""
    from discli.demo.run import DemoConfig, run_demo
    from discli.infer.settings import parse_steps
    from discli.demo.report import table_rows

    options = dict(out=str(out), t_tr=parse_steps(t_tr, "t_tr"), t_ts=parse_steps(t_ts),
                   seed=seed, device=device, difficulty=difficulty, n_labelled=n_labelled,
                   min_size=min_size, max_size=max_size, workers=workers)
    cfg = DemoConfig.quick_config(**options) if quick else DemoConfig(**options)
    with RichReporter(quiet=quiet) as reporter:
        report = run_demo(cfg, reporter=reporter)
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    table = Table(title="mIoU on the synthetic test images (Table 3 layout)")
    for column in ["setup", *report["classes"], "mIoU"]:
        table.add_column(column, justify="left" if column == "setup" else "right")
    for label, ious, miou in table_rows(report):
        table.add_row(label, *("-" if x is None else f"{100 * x:.1f}" for x in ious),
                      f"[bold]{100 * miou:.1f}")
    err_console.print(table)
    for name, stats in report["tags"].items():
        noisy, cleaned = stats["noisy"]["micro"]["f1"], stats["cleaned"]["micro"]["f1"]
        err_console.print(f"tags F1 ({name} E-step): noisy {100 * noisy:.1f} -> cleaned "
                          f"{100 * cleaned:.1f}")
    for name, rounds in report.get("pseudo_labels", {}).items():
        err_console.print(f"pseudo-label mIoU ({name} E-steps, rounds 1..{len(rounds)}): "
                          + " -> ".join(f"{100 * r['miou']:.1f}" for r in rounds))
    err_console.print(f"report: {out / 'report.md'}  figures: {out / 'figure.png'}, "
                      f"{out / 'curves.png'}")
