"""Options shared by `dis pretrain` and `dis finetune`, turned into a TrainConfig."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Optional

import typer

from discli.configs import PRESETS
from discli.errors import UsageError
from discli.train.config import TrainConfig, load_config


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set key=value` with TOML value syntax (bare words are taken as strings)."""
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


def build_config(config: Optional[Path], sets: list[str], section: Optional[str] = None,
                 **options: Any) -> TrainConfig:
    """``--config`` (a file or a preset name; its [train] table, then its ``section`` table:
    "pretrain" or "finetune") < the options given < ``--set``."""
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    overrides.update(parse_sets(sets))
    return load_config(config, overrides, section=section)


ConfigOpt = typer.Option(None, "--config", help="TOML file of training options (flat keys, or "
                         "a shared 'train' table plus 'pretrain' and 'finetune' tables), or a "
                         f"shipped preset: {', '.join(PRESETS)}. The command line wins.")
SetOpt = typer.Option([], "--set", help="Any other option as KEY=VALUE (TOML syntax), "
                      "e.g. --set head_lr_mult=10. Repeatable.")
OutOpt = typer.Option(None, "--out", "-o", help="Run folder (checkpoints, logs, caches).")
LabelledOpt = typer.Option(None, "--labelled", help="Manifest of pixel-labelled images.")
RootOpt = typer.Option(None, "--root", help="Root folder the manifests' paths are relative to.")
BackboneOpt = typer.Option(None, "--backbone", help="Backbone name (see `dis plugins`).")
WeightsOpt = typer.Option(None, "--backbone-weights",
                          help="'imagenet' (torchvision download) or a local state-dict path.")
BatchOpt = typer.Option(None, "--batch-size", help="Global batch size.")
CropOpt = typer.Option(None, "--crop-size", help="Training crop size in pixels.")
LrOpt = typer.Option(None, "--lr", help="Backbone learning rate (new layers: x head_lr_mult).")
SeedOpt = typer.Option(None, "--seed")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
WorkersOpt = typer.Option(None, "--num-workers", help="DataLoader worker processes.")
AmpOpt = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA.")
ValOpt = typer.Option(None, "--val", help="Manifest with labelmaps to log validation mIoU "
                      "(t = 0) on while training (log.jsonl: val_miou).")
ValEveryOpt = typer.Option(None, "--val-every", min=0, help="Validate every N iterations "
                           "(and at the end of each step; 0 = only there).")
JsonOpt = typer.Option(False, "--json", help="Print the summary as JSON on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
