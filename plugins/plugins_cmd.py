"""`dis plugins`: list the command and backbone plugins with their distribution and version."""

from __future__ import annotations

from dis_plugins.options import json_option
from discli.cli.output import print_json
from discli.entrypoints import BACKBONES_GROUP, load_group


def plugins(json_out: bool = json_option("One JSON object per line.")) -> None:
    """List installed plugins (commands and backbones) with distribution and version."""
    from discli.cli.app import LOADED

    rows = list(LOADED) + load_group(BACKBONES_GROUP)
    if json_out:
        for p in rows:
            print_json({"name": p.name, "group": p.group, "distribution": p.distribution,
                        "version": p.version, "value": p.value, "ok": p.ok, "error": p.error})
        return
    from rich.table import Table

    from discli.cli.output import console

    table = Table("group", "name", "distribution", "version", "status")
    for p in rows:
        table.add_row(p.group, p.name, p.distribution, p.version, "ok" if p.ok else p.error)
    console().print(table)
