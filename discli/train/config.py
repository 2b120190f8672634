"""The training configuration: one flat :class:`TrainConfig` (``cfg.lr``; its keys are declared in
:mod:`discli.train.keys`), read from a TOML file (or a shipped preset, :mod:`discli.configs`)
and overridden by the command line.

The effective configuration is stored in every checkpoint and written beside it
(``config.toml``), so a run can be rebuilt and resumed from its folder alone.

Every key belongs to one *group* (:data:`GROUPS`, ``dis config keys`` shows it): ``data``
(manifests, crops), ``model`` (backbone), ``optim`` (optimiser, losses, schedule), ``pretrain``
(the keys only pretraining uses), ``finetune`` (only fine-tuning), ``inference`` (``t_tr``,
``t_ts``, ``inf_*``) and ``run`` (seed, device, checkpointing, logging).

A config file has two kinds of tables, and the difference matters for a key such as
``loss_img`` that differs between the two commands:

- *shared* tables, read by both ``dis pretrain`` and ``dis finetune``: top-level keys (a flat
  file), ``[train]`` and its group sub-tables ``[train.model]``, ``[train.optim]``,
  ``[train.pretrain]``, ... and the top-level group tables ``[data]``, ``[model]``, ``[optim]``,
  ``[inference]``, ``[run]`` (the same as ``[train.<group>]``);
- *command* tables ``[pretrain]`` and ``[finetune]``, read only by that command, after the
  shared ones (overrides: ``[pretrain] loss_img = 1.0``, ``[finetune] loss_img = 0.0``); they
  may hold flat keys or group sub-tables (``[finetune.inference]``). The other command's table
  is checked, not used.

A file may name another with ``extends = "NAME"`` (a preset, or a file path relative to it):
that file's tables apply first, so a preset states only what it changes (``quick`` extends
``demo``).

A key in a group table must belong to that group; where a key is given twice, the later
table wins (in the order above: top-level keys, [train], its sub-tables, the top-level group
tables, then the command's table and its sub-tables). What :func:`dump_toml` writes (a run's
``config.toml``) is every key in its ``[train.<group>]`` table: it reads back the same for
either command. The older layouts (a flat file; one ``[train]`` table; ``[train]`` +
``[pretrain]`` + ``[finetune]``, as the shipped presets) read as before. On the command line
``--set KEY=VALUE`` sets a key, ``--set GROUP.KEY=VALUE`` too (``--set inference.t_tr=30``:
the key must be in that group), and ``--set COMMAND.KEY=VALUE`` only for that command
(``--set finetune.t_tr=30``: :func:`split_set_key`).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from discli.data.fileio import read_text
from discli.errors import BadInputError
from discli.train.keys import (GROUPS, TrainConfig, coerce, key_group, unknown_key_message,
                               validate)

__all__ = ["SECTIONS", "dump_toml", "file_values", "load_config", "resolve_config_path",
           "split_set_key"]


SECTIONS = ("pretrain", "finetune")


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped preset of that name
    (:mod:`discli.configs`, e.g. "demo"); neither: a one-line error listing the presets."""
    from discli.configs import PRESETS, preset_path

    path = Path(path)
    if path.is_file():
        return path
    preset = preset_path(str(path))
    if preset is not None:
        return preset
    if path.is_dir():
        raise BadInputError("expected a TOML config file, found a folder", path)
    raise BadInputError(f"config file not found (presets: {', '.join(PRESETS)})", path)


SHARED_TABLES = tuple(g for g in GROUPS if g not in SECTIONS)  # top-level shared group tables


def split_set_key(key: str) -> tuple[str | None, str]:
    """``"finetune.t_tr"`` -> ``("finetune", "t_tr")``; ``"t_tr"`` -> ``(None, "t_tr")``. The
    prefix is a group (the key must be in it), a command ("pretrain"/"finetune": only that
    command applies it) or "train"; BadInputError for anything else."""
    if "." not in key:
        return None, key
    table, name = key.split(".", 1)
    if table not in (*GROUPS, "train"):
        raise BadInputError(f"unknown table {table!r} in {key!r} (tables: "
                            f"{', '.join(GROUPS)})")
    if table not in (*SECTIONS, "train"):
        _check_group(table, name, None)
    return table, name


def _check_group(group: str, name: str, where: str | None) -> None:
    try:
        actual = key_group(name)
    except KeyError:
        raise BadInputError(unknown_key_message(name), where) from None
    if actual != group:
        raise BadInputError(f"key {name!r} belongs in [{actual}], not [{group}]", where)


def _flatten(table: dict[str, Any], where: str, group_tables: tuple[str, ...], check: bool
             ) -> list[tuple[str, dict[str, Any]]]:
    """A table's own keys, then those of its group sub-tables (``[train.model]``), each as
    ``(where, keys)``; with ``check``, a key of a group sub-table must be in that group."""
    own = {k: v for k, v in table.items() if not (k in group_tables and isinstance(v, dict))}
    out = [(where, own)]
    for group in group_tables:
        sub = table.get(group)
        if not isinstance(sub, dict):
            continue
        sub_where = f"{where[:-1]}.{group}]"  # "file [train]" -> "file [train.model]"
        if check:
            for key in sub:
                _check_group(group, key, sub_where)
        out.append((sub_where, sub))
    return out


def _config_tables(data: dict[str, Any], section: str | None, source: str, check: bool = True
                   ) -> list[tuple[str, dict[str, Any]]]:
    """The tables of a config file that apply to ``section``, in order: the shared ones
    (top-level keys, [train] and its group sub-tables, the top-level group tables), then
    [pretrain] or [finetune] (and their group sub-tables). A flat file is one table of top-level
    keys. ``check=False`` (reading a run's own record) skips the checks of keys and values."""
    tables_ = ("train", *SECTIONS, *SHARED_TABLES)
    flat = {k: v for k, v in data.items() if k not in tables_}
    shared: list[tuple[str, dict[str, Any]]] = [(source, flat)]
    command: list[tuple[str, dict[str, Any]]] = []
    for name in tables_:
        if name not in data:
            continue
        table = data[name]
        where = f"{source} [{name}]"
        if not isinstance(table, dict):
            raise BadInputError(f"{name!r} must be a table ([{name}]) of training options",
                                source)
        if name in SHARED_TABLES:
            parts = [(where, table)]
            if check:
                for key in table:
                    _check_group(name, key, where)
        else:
            parts = _flatten(table, where, GROUPS, check)
        if check:
            for part_where, part in parts:
                for key, value in part.items():
                    coerce(key, value, part_where)  # a typo in the other section is caught too
        if name in SECTIONS:
            if name == section:
                command += parts
        else:
            shared += parts
    if section is None and any(name in data for name in SECTIONS):
        raise BadInputError("the file has [pretrain]/[finetune] tables: say which one applies "
                            "(load_config(..., section=...))", source)
    return shared + command


def file_values(data: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """The keys of a parsed config file as one flat dict (as ``section`` reads them), unchecked:
    how a run's own ``config.toml`` (any layout this or an older version wrote) is read back."""
    values: dict[str, Any] = {}
    for _, table in _config_tables(data, section or "pretrain", "config", check=False):
        values.update(table)
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # bounded and regular-file-only, as every text input (a FIFO would never end)
        return tomllib.loads(read_text(path, "config file"))
    except FileNotFoundError:
        raise BadInputError("config file not found", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read the config file: {exc.strerror or exc}", path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"not valid TOML: {exc}", path) from None


def _file_tables(path: Path, section: str | None, chain: tuple[Path, ...] = ()
                 ) -> list[tuple[str, dict[str, Any]]]:
    """The tables of a config file (:func:`_config_tables`) after those of the file it
    ``extends``: a preset name or a path relative to the file (``extends = "demo"`` in
    ``quick.toml``), itself read the same way, so a file states only what it changes."""
    data = _read_toml(path)
    parent = data.pop("extends", None)
    inherited: list[tuple[str, dict[str, Any]]] = []
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise BadInputError("'extends' must name a preset or a config file", path)
        nearby = path.parent / parent
        base = resolve_config_path(nearby if nearby.is_file() else parent)
        if base.resolve() in {p.resolve() for p in (*chain, path)}:
            raise BadInputError(f"'extends' loops back to {base}", path)
        inherited = _file_tables(base, section, (*chain, path))
    return inherited + _config_tables(data, section, str(path))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None, section: str | None = None) -> TrainConfig:
    """Defaults (or ``base``) < TOML file < command-line overrides: :func:`load_config_origins`
    without the origins."""
    return load_config_origins(path, overrides, base, section)[0]


def load_config_origins(path: str | Path | None = None,
                        overrides: dict[str, Any] | None = None, base: TrainConfig | None = None,
                        section: str | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """Defaults (or ``base``) < TOML file < command-line overrides (None = not given), and
    where each key that is not a default was set (a file and its table, or "command line").

    ``path`` is a TOML file or the name of a shipped preset (:mod:`discli.configs`, used when no
    file of that name exists). The file holds flat keys, or tables (module docstring): the
    shared ones apply first, then those of the ``section`` table ("pretrain" or "finetune": the
    command being configured); the other section's table is checked, not used.
    """
    if section is not None and section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)} or None, got {section!r}")
    values: dict[str, Any] = dataclasses.asdict(base or TrainConfig())
    origins: dict[str, str] = {}
    if path:
        for source, table in _file_tables(resolve_config_path(path), section):
            for key, value in table.items():
                values[key] = coerce(key, value, source)
                origins[key] = source
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, "overrides")
            origins[key] = "command line"
    return validate(TrainConfig(**values), str(path or "command line"), origins), origins


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def dump_toml(cfg: TrainConfig, table: str = "train",
              keys: typing.Collection[str] | None = None, grouped: bool = True) -> str:
    """The keys of ``cfg`` (all, or ``keys``) as TOML, one sub-table per group under
    ``[table]``: ``[train.data]``, ``[train.model]``, ... (what a run folder's config.toml
    holds, read back by :func:`load_config` for either command), or ``[pretrain.optim]``, ... for
    a command table; ``grouped=False``: flat keys in ``[table]``."""
    values = cfg.to_dict()
    groups = {f.name: f.metadata["group"] for f in fields(TrainConfig)}
    lines = [f"[{table}]"]
    if not grouped:
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
                  if keys is None or key in keys]
        return "\n".join(lines) + "\n"
    for group in GROUPS:
        names = [k for k in values if groups[k] == group and (keys is None or k in keys)]
        if names:
            lines += ["", f"[{table}.{group}]"]
            lines += [f"{key} = {_toml_value(values[key])}" for key in names]
    return "\n".join(lines) + "\n"
