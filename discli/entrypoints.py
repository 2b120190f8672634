"""Plugin discovery through installed entry points (no CLI code here).

Groups: ``dis.commands`` (subcommands: a ``typer.Typer`` group or a plain function) and
``dis.backbones`` (backbone factories). The built-in commands and backbones are declared in
``pyproject.toml`` in these same groups, exactly as a third-party package declares its own.

``DIS_LOAD_PLUGINS`` restricts which plugins load: a comma-separated list of entry-point names
(``DIS_LOAD_PLUGINS=pretrain,infer``); unset loads all; an empty value loads none.
"""

from __future__ import annotations

import contextlib
import os
import sys
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


def backbone_names() -> set[str]:
    """The backbones a config may name, without importing torch: the entry points of
    ``dis.backbones`` (the built-in ones are declared there too) and any factory registered
    in this process."""
    names = {ep.name for ep in entry_points(BACKBONES_GROUP)}
    registry = getattr(sys.modules.get("discli.model.backbones"), "BACKBONES", None)
    return names | set(getattr(registry, "_factories", {}))


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


class PluginLoadError(Exception):
    """An entry point whose module failed to import or exited while importing."""


def load_entry_point(ep: metadata.EntryPoint) -> Any:
    """``ep.load()``, shielded from what a broken plugin module may do on import: raise
    (PluginLoadError), call ``sys.exit`` (which would end dis with that code having run nothing:
    PluginLoadError too), or print (to stderr here: stdout carries the commands' data, such as
    ``--json`` lines). A KeyboardInterrupt still interrupts."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return ep.load()
    except SystemExit as exc:
        raise PluginLoadError(f"SystemExit: the module exited while loading (code "
                              f"{exc.code!r})") from None
    except Exception as exc:
        raise PluginLoadError(f"{type(exc).__name__}: {exc}") from None


def load_group(group: str) -> list[Plugin]:
    """Load every allowed entry point of ``group``; failures are recorded, never raised."""
    plugins = []
    for ep in entry_points(group):
        plugin = describe(ep, group)
        if not allowed(ep.name):
            plugin.error = f"not loaded ({ALLOW_ENV})"
        else:
            try:
                plugin.obj = load_entry_point(ep)
            except PluginLoadError as exc:  # a broken plugin must never take the others down
                plugin.error = str(exc)
        plugins.append(plugin)
    return plugins
