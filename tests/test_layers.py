"""The library's layers (docs/architecture.md), checked over the import graph.

Every ``import`` and ``from ... import`` in ``discli/``, those inside functions included, may
only reach a module of its own layer or a lower one; ``discli/`` never imports the plugins or
typer/rich below the CLI layer; and only a handful of modules sit directly under ``discli/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "discli"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS: list[tuple[str, ...]] = [
    ("discli", "discli.errors", "discli.registry", "discli.entrypoints", "discli.distributed",
     "discli.progress", "discli.storage", "discli.configs"),
    ("discli.data",),
    ("discli.synth",),
    ("discli.model",),
    ("discli.infer",),
    ("discli.evaluation",),
    ("discli.pseudo",),
    ("discli.train",),
    ("discli.demo",),
    ("discli.cli", "discli.__main__"),
]
ROOT_MODULES = {"__init__.py", "__main__.py", "errors.py", "registry.py", "entrypoints.py",
                "distributed.py", "progress.py"}
CLI_ONLY = ("typer", "rich", "click", "dis_plugins")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return rank


def is_module(name: str) -> bool:
    where = ROOT.parent.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or where.is_dir()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, those in functions included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from discli import tags` imports the module discli.tags
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names
                      if is_module(f"{name}.{a.name}")]
    return found


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in FILES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_import_reaches_up(path: Path) -> None:
    module = module_name(path)
    own = layer_of(module)
    upward = []
    for line, name in imports(path):
        if name.split(".")[0] in CLI_ONLY and own < layer_of("discli.cli"):
            upward.append(f"line {line}: {name} (CLI only)")
        elif name == "discli" or name.startswith("discli."):
            if layer_of(name) > own:
                upward.append(f"line {line}: {name} (layer {layer_of(name)} > {own})")
    assert not upward, f"{module} imports up: " + "; ".join(upward)


def test_a_handful_of_modules_at_the_root() -> None:
    assert {p.name for p in ROOT.glob("*.py")} == ROOT_MODULES


def test_the_check_sees_upward_imports(tmp_path: Path) -> None:
    # the walker must see function-level and relative imports, or the test above proves nothing
    probe = ROOT / "data" / "labelmap.py"
    names = {name for _, name in imports(probe)}
    assert "discli.errors" in names
    assert layer_of("discli.train.estep") > layer_of("discli.pseudo.cache") > layer_of("discli.data")
    assert layer_of("discli.infer.checkpoint") == layer_of("discli.infer")


def test_every_package_is_packaged() -> None:
    import tomllib

    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    assert packages - listed == set(), "packages missing from pyproject's [tool.setuptools]"
