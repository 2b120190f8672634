"""`dis config`: the training configuration keys, and presets or config files resolved."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import asdict

import typer

from dis_plugins.options import json_option
from discli.cli.output import print_json
from discli.errors import UsageError
from discli.train.config import SECTIONS, dump_toml, load_config, resolve_config_path
from discli.train.keys import config_keys

app = typer.Typer(help="Training configuration: every --set/--config key, presets resolved.",
                  no_args_is_help=True)

StageOpt = typer.Option(None, "--stage", help="Only the keys of this command: pretrain or "
                        "finetune.", show_default="both")
JsonOpt = json_option("JSON on stdout.")


def _stage(stage: str | None) -> str | None:
    if stage is not None and stage not in SECTIONS:
        raise UsageError(f"--stage must be pretrain or finetune, got {stage!r}")
    return stage


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return '""' if value == "" else str(value)


@app.command("keys")
def keys(stage: str | None = StageOpt, json_out: bool = JsonOpt) -> None:
    """Every key of --set KEY=VALUE and of --config files: default, stage, group, one line of
    help.

    Keys marked 'any' in the 'rerun' column change no result: a run may be continued with
    other values of them. The group is the table a key is written in (\\[train.<group>], or
    \\[<group>]; `--set GROUP.KEY=VALUE`).
    """
    stage = _stage(stage)
    rows = [k for k in config_keys() if stage is None or k.stage in (None, stage)]
    if json_out:
        print_json([asdict(k) for k in rows])
        return
    table = [("key", "type", "default", "used by", "rerun", "group", "help")]
    table += [(k.name, k.type, _shown(k.default), k.stage or "both",
               "any" if k.neutral else "same", k.group, k.help) for k in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:  # plain aligned columns: never cut, easy to grep
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
                         + "\n")


@app.command("show")
def show(name: str = typer.Argument(..., metavar="NAME_OR_PATH",
                                    help="A shipped preset (demo, quick, ...) or a TOML file."),
         stage: str | None = StageOpt, json_out: bool = JsonOpt) -> None:
    """A preset or config file resolved: every key a command uses, with the value a run would
    get.

    The output is itself a config file: without --stage, the keys both commands use and get
    the same value of in shared \\[train.<group>] tables, then a \\[pretrain] and a
    \\[finetune] table with the keys only that command uses (or gets another value of); with
    --stage, one \\[<stage>] table.
    """
    stage = _stage(stage)
    path = resolve_config_path(name)
    stages = [stage] if stage else list(SECTIONS)
    configs = {s: load_config(path, section=s) for s in stages}
    # a key of the other command (iters_step1 under [finetune]) would read as if it mattered
    used = {s: [k.name for k in config_keys() if k.stage in (None, s)] for s in stages}
    if json_out:
        print_json({s: {k: v for k, v in asdict(cfg).items() if k in used[s]}
                    for s, cfg in configs.items()})
        return
    text = f"# {name} ({path}), resolved: every key each command uses\n"
    if len(configs) == 1:
        text += "".join(dump_toml(cfg, table=s, keys=used[s]) for s, cfg in configs.items())
    else:
        pre, fine = asdict(configs["pretrain"]), asdict(configs["finetune"])
        shared = [k for k in used["pretrain"] if k in used["finetune"] and pre[k] == fine[k]]
        text += dump_toml(configs["pretrain"], "train", keys=shared)
        for s, cfg in configs.items():
            own = [k for k in used[s] if k not in shared]
            text += "\n" + dump_toml(cfg, table=s, keys=own, grouped=False)
    tomllib.loads(text)  # what we print must read back
    sys.stdout.write(text)
