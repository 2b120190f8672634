"""Plugin discovery through installed entry points (no CLI code here).

Groups: ``dis.commands`` (subcommands: a ``typer.Typer`` group or a plain function) and
``dis.backbones`` (backbone factories). The built-in commands and backbones are declared in
``pyproject.toml`` in these same groups, exactly as a third-party package declares its own.

``DIS_LOAD_PLUGINS`` restricts which plugins load: a comma-separated list of entry-point names
(``DIS_LOAD_PLUGINS=pretrain,infer``); unset loads all; an empty value loads none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

COMMANDS_GROUP = "dis.commands"
BACKBONES_GROUP = "dis.backbones"
ALLOW_ENV = "DIS_LOAD_PLUGINS"


@dataclass
class Plugin:
    name: str
    group: str
    value: str  # "module:attr"
    distribution: str
    version: str
    obj: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def entry_points(group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=group))


def allowed(name: str) -> bool:
    spec = os.environ.get(ALLOW_ENV)
    if spec is None:
        return True
    return name in {part.strip() for part in spec.split(",") if part.strip()}


def describe(ep: metadata.EntryPoint, group: str) -> Plugin:
    dist = getattr(ep, "dist", None)
    return Plugin(name=ep.name, group=group, value=ep.value,
                  distribution=dist.name if dist is not None else "?",
                  version=dist.version if dist is not None else "?")


def load_group(group: str) -> list[Plugin]:
    """Load every allowed entry point of ``group``; failures are recorded, never raised."""
    plugins = []
    for ep in entry_points(group):
        plugin = describe(ep, group)
        if not allowed(ep.name):
            plugin.error = f"not loaded ({ALLOW_ENV})"
        else:
            try:
                plugin.obj = ep.load()
            except Exception as exc:  # a broken plugin must never take the others down
                plugin.error = f"{type(exc).__name__}: {exc}"
        plugins.append(plugin)
    return plugins
