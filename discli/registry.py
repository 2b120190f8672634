"""A strict name -> factory registry (torchvision's `_api.py` behaviour: duplicates raise).

Built-in factories registered by other modules are imported lazily (``builtins=``). Factories
may also come from installed entry points: `Registry(group=...)` loads that group the
first time a name is missing, so a third-party package adds a backbone or a dataset format by
declaring an entry point, exactly as the built-in ones do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from discli.entrypoints import PluginLoadError, allowed, describe, load_entry_point
from discli.errors import UsageError, warn

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    def __init__(self, kind: str, group: str | None = None, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        # modules that register built-in factories, imported the first time a name is missing
        # (so they may import the registry's module without an import cycle)
        self.builtins = builtins
        self._factories: dict[str, F] = {}
        self._packages: dict[str, str] = {}  # name -> distribution, for plugins' factories
        self._entry_points_loaded = False

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            self.add(name or fn.__name__, fn)
            return fn

        return wrap

    def add(self, name: str, fn: F) -> None:
        existing = self._factories.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = fn

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for module in self.builtins:
            importlib.import_module(module)
        if self.group is None:
            return
        for ep in entry_points(group=self.group):
            if ep.name in self._factories or not allowed(ep.name):
                continue
            package = describe(ep, self.group).distribution
            try:
                self.add(ep.name, load_entry_point(ep))
            except PluginLoadError as exc:  # a broken plugin must not break the others
                warn(f"{self.kind} plugin {ep.name!r} ({package}) failed to load: {exc}")
                continue
            self._packages[ep.name] = package

    def package(self, name: str) -> str | None:
        """The distribution whose entry point added ``name``; None for a built-in."""
        return self._packages.get(name)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._factories)

    def get(self, name: str) -> F:
        if name not in self._factories:
            self._load_entry_points()
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names())
            raise UsageError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.names()
