"""The options the commands share, declared once.

- every command: :func:`json_option` (the one ``--json`` flag), :data:`DEVICE_HELP` (the one
  ``--device`` help);
- `dis pretrain` and `dis finetune` (turned into a TrainConfig): an option of a config key
  defaults to None (not given), so that a --config file or preset can set the key; its help is
  the key's own (:func:`discli.train.config.config_keys`) and the default it shows is
  TrainConfig's (:func:`key_option`, ``BatchOpt``, ``LrOpt``, ...);
- the commands that run inference on a checkpoint (`dis infer`, `dis evaluate`, `dis clean-tags
  run`): ``Inf*Opt``.
  Their inference settings (step, momentum, iterations, tag weight) default to None: a setting
  not given on the command line comes from the checkpoint
  (:func:`discli.infer.checkpoint.inference_settings`: what the run was trained with, or the library
  defaults for a checkpoint that carries none).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from discli.configs import PRESETS
from discli.errors import BadInputError, UsageError
from discli.train.config import SECTIONS, load_config, split_set_key
from discli.train.keys import MAX_WORKERS, TrainConfig, coerce, unknown_key_message

_FIELDS = {f.name: f for f in fields(TrainConfig)}

DEVICE_HELP = "Device: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'."


def json_option(help: str) -> Any:
    """The ``--json`` flag of a command (``json_out: bool = json_option("...")``)."""
    return typer.Option(False, "--json", help=help)


def parse_sets(items: list[str], section: str | None = None) -> dict[str, Any]:
    """`--set key=value` with TOML value syntax (bare words are taken as strings); an unknown
    key or a value of the wrong type is a usage error naming the --set. The key may name its
    table (:func:`discli.train.config.split_set_key`): ``inference.t_tr=30`` (a group: the key
    must be in it) or ``finetune.t_tr=30`` (a command: checked, but applied only when
    ``section`` is that command)."""
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            table, key = split_set_key(key.strip().replace("-", "_"))
        except BadInputError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
        if key not in _FIELDS:
            raise UsageError(f"--set {item}: {unknown_key_message(key)}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        try:
            value = coerce(key, value, f"--set {item}")
        except BadInputError as exc:
            raise UsageError(str(exc)) from None
        if table in SECTIONS and table != section:
            continue  # the other command's setting
        values[key] = value
    return values


def build_config(config: Path | None, sets: list[str], section: str | None = None,
                 **options: Any) -> TrainConfig:
    """``--config`` (a file or a preset name; its [train] table, then its ``section`` table:
    "pretrain" or "finetune") < the options given and ``--set``.

    An option and a ``--set`` of the same key must agree (``--crop-size 7 --set crop_size=64``
    is refused, not silently one of them). A bad value in the config file is bad input (exit 3,
    naming the file); a bad value on the command line is a bad option (exit 2).
    """
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    for key, value in parse_sets(sets, section).items():
        given = overrides.get(key)
        if given is not None and given != value:
            raise UsageError(f"--{key.replace('_', '-')} {given} and --set {key}={value} "
                             f"disagree; give one of them")
        overrides[key] = value
    from_file = load_config(config, section=section)  # the file's own problems: exit 3
    try:
        cfg = load_config(None, overrides, base=from_file, section=section)
    except BadInputError as exc:  # the file was fine on its own: the command line is not
        raise UsageError(str(exc)) from None
    _refuse_overwriting_inputs(cfg, config, section)
    return cfg


def _refuse_overwriting_inputs(cfg: TrainConfig, config: Path | None,
                               section: str | None) -> None:
    """The files a run writes in ``<out>/<section>/`` may not be files it reads (``--config
    runs/x/pretrain/config.toml --out runs/x`` would replace the file it was configured from)."""
    from discli.storage.safety import refuse_overlap

    if not cfg.out or section is None:
        return
    folder = Path(cfg.out) / section
    if config is not None and _is_run_record(Path(config), folder / "config.toml", section):
        config = None  # the run's own record, as dis wrote it: rewriting it loses nothing
    reads = [(config, "--config file"), (cfg.labelled or None, "labelled manifest"),
             (getattr(cfg, "tagged", "") or None, "tagged manifest"),
             (getattr(cfg, "val", "") or None, "validation manifest"),
             (getattr(cfg, "init", "") or None, "--init checkpoint")]
    refuse_overlap([(folder / name, f"run's {name}") for name in ("config.toml", "log.jsonl",
                                                                   "last.pth", "final.pth")],
                   reads, advice="choose another --out, or copy the file elsewhere first")


def _is_run_record(config: Path, record: Path, section: str) -> bool:
    """Whether ``--config`` is the run folder's own ``config.toml`` as dis wrote it: the refusal
    of changed settings points the user at that file, so passing it back must work. Its rewrite
    (with the same keys, or other values of the keys that change no result) loses nothing; a
    file of the user's own at that path (notes, another layout) is still protected."""
    import os

    from discli.errors import DisError
    from discli.train.config import dump_toml

    try:
        if not os.path.samefile(config, record):
            return False
        return record.read_text(encoding="utf-8") == dump_toml(load_config(record,
                                                                           section=section))
    except (OSError, UnicodeDecodeError, DisError):
        return False


def check_inputs(manifests: Iterable[tuple[str | Path | None, str | Path | None]] = (),
                 checkpoint: str | Path | None = None) -> None:
    """Read the manifests (``(path, root)`` pairs; None, "" and stdin's "-" skipped) and check
    that the checkpoint exists, before a command imports the library's torch code: a mistyped
    path is then refused in a fraction of a second instead of after seconds of imports, and
    before any output folder is made. The library reads them again (a manifest is small)."""
    from discli.data.manifest import read_manifest

    for path, root in manifests:
        if path is not None and str(path) not in ("", "-"):
            read_manifest(str(path), root=root or None)
    if checkpoint is not None and not Path(checkpoint).exists():
        raise BadInputError("checkpoint not found", checkpoint)


def train_inputs(cfg: TrainConfig, section: str) -> None:
    """:func:`check_inputs` of the manifests and --init checkpoint a training command reads."""
    stages = {f.name: f.metadata["stage"] for f in fields(TrainConfig)}
    check_inputs([(getattr(cfg, key), cfg.root) for key in ("labelled", "tagged", "val")
                  if stages[key] in (None, section)],
                 checkpoint=(cfg.init or None) if section == "finetune" else None)


@contextmanager
def no_empty_run_folder(out: str | Path, section: str) -> Iterator[None]:
    """The folders (``<out>/<section>`` and up) a training command creates are removed when it
    fails before writing anything but its lock (a refused or mistyped input), so that a
    failed first try leaves no run folder behind that looks like a started run."""
    folder = Path(out) / section
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for path in created:
            _remove_if_only_lock(path)
        raise


def _remove_if_only_lock(folder: Path) -> None:
    from discli.errors import BusyError
    from discli.storage.lock import LOCK_NAME, lock_folder

    try:
        if any(not p.name.startswith(LOCK_NAME) for p in folder.iterdir()):
            return
        # holding the lock while unlinking it: a process that opened it meanwhile is refused
        # (BusyError) instead of locking a file that no longer has a name
        with lock_folder(folder):
            for lock in folder.glob(LOCK_NAME + "*"):
                lock.unlink()
        folder.rmdir()
    except (OSError, BusyError):
        pass  # something else is there now: leave it


def parse_ints(values: list[str] | None, option: str) -> list[int]:
    """``--iters 1000,300,500`` or ``--iters 1000 --iters 300 --iters 500``: the integers."""
    parts = [p for v in values or [] for p in v.replace(" ", "").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        given = ",".join(values or [])
        raise typer.BadParameter(f"expected comma-separated integers, got {given!r}",
                                 param_hint=option) from None


def shown_default(name: str) -> str:
    """TrainConfig's default of a key as --help shows it."""
    value = _FIELDS[name].default
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value == "" else str(value)


def output_folder(value: str | Path) -> Path:
    """``--out DIR``: an empty value (an unset shell variable) would be the current folder."""
    if isinstance(value, Path):  # a default, or a value converted before
        return value
    if not value.strip():
        raise typer.BadParameter("an empty path (an unset shell variable?)")
    return Path(value)


def output_file(value: str | Path) -> Path:
    """``--out FILE``: not empty, and a name a file can have (not ``/``, ``.`` or ``..``)."""
    path = output_folder(value)
    if path.name in ("", ".", ".."):
        raise typer.BadParameter(f"{str(value)!r} is a folder, not a file name")
    return path


def key_option(name: str, *flags: str, help: str | None = None, **kwargs: Any) -> Any:
    """The option of config key ``name``: None unless given, the key's help and default."""
    text = help or _FIELDS[name].metadata["help"]
    return typer.Option(None, *(flags or (f"--{name.replace('_', '-')}",)),
                        help=text[0].upper() + text[1:] + ".",
                        show_default=kwargs.pop("show_default", shown_default(name)), **kwargs)


ConfigOpt = typer.Option(None, "--config", help="TOML file of training options (flat keys, or "
                         "shared tables ('train', 'train.<group>', '<group>') plus 'pretrain' and "
                         "'finetune' tables for one command), or a "
                         f"shipped preset: {', '.join(PRESETS)} (`dis config show NAME`). The "
                         "defaults shown here are TrainConfig's, which the file replaces; the "
                         "command line wins over both.", show_default="none")
SetOpt = typer.Option([], "--set", metavar="KEY=VALUE", help="Any config key as KEY=VALUE "
                      "(TOML syntax), e.g. --set head_lr_mult=10; repeatable. The key may name "
                      "its group (--set inference.t_tr=30) or the command it is for (--set "
                      "finetune.t_tr=30: ignored by the other). `dis config keys` lists every "
                      "key.",
                      show_default=False)
OutOpt = typer.Option(..., "--out", "-o", parser=output_folder, help="Run folder (checkpoints, "
                      "logs, caches). Re-running on it continues its run, with the same settings "
                      "only.")
LabelledOpt = key_option("labelled", help="manifest of pixel-labelled images (required, unless "
                         "--config sets labelled)", show_default=False)
RootOpt = key_option("root", show_default=False)
BackboneOpt = key_option("backbone")
WeightsOpt = key_option("backbone_weights")
BatchOpt = key_option("batch_size")
CropOpt = key_option("crop_size")
LrOpt = key_option("lr")
SeedOpt = key_option("seed")
DeviceOpt = key_option("device", help=DEVICE_HELP[len("Device: "):].rstrip("."))
WorkersOpt = key_option("num_workers", "--num-workers", min=0, max=MAX_WORKERS)
AmpOpt = key_option("amp", "--amp/--no-amp", show_default="amp")
ValOpt = key_option("val")
ValEveryOpt = key_option("val_every", min=0)
TensorBoardOpt = typer.Option(False, "--tensorboard", help="Also write the log (losses, "
                              "learning rate, E-step statistics, validation mIoU) as "
                              "TensorBoard events in <out>/<command>/tensorboard/ (needs the "
                              "tensorboard package: the project's 'tensorboard' extra).")
JsonOpt = json_option("Print the summary as one line of JSON on stdout (instead of the "
                      "checkpoint path).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table.")

# --- inference on a checkpoint: dis infer, dis evaluate, dis clean-tags run -------------------

InfBatchOpt = typer.Option(8, "--batch-size", "-b", min=1, help="Images per batch (images of one "
                           "size only).")
InfWorkersOpt = typer.Option(0, "--num-workers", min=0, max=MAX_WORKERS,
                             help="DataLoader worker processes.")
# The older spelling, still accepted and left out of --help (one spelling per idea).
InfOldWorkersOpt = typer.Option(None, "--workers", min=0, max=MAX_WORKERS, hidden=True)
InfDeviceOpt = typer.Option(None, "--device", help=DEVICE_HELP, show_default="auto")
InfAmpOpt = typer.Option(True, "--amp/--no-amp", help="float16 backbone forward on CUDA.")
InfLrOpt = typer.Option(None, "--lr", help="Inference step size (default: the checkpoint's).")
InfMomentumOpt = typer.Option(None, "--momentum", help="Inference momentum (default: the "
                              "checkpoint's).")
InfCompileOpt = typer.Option(False, "--compile/--no-compile", help="Compile the low-rank inference "
                             "steps (torch.compile; once per input size, 10-60 s): faster at "
                             "t_ts > 0 on many images of one size. Falls back to the plain steps "
                             "with a warning where no compiler works.")
OverlayFormatOpt = typer.Option("jpg", "--overlay-format", metavar="jpg|png",
                                help="File format of the overlays: jpg (small) or png (exact "
                                "colours, no compression artefacts at class edges).")
NoProgressOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
InfQuietOpt = NoProgressOpt

# ---------------------------------------------------------------- data preparation (prepare-*)
DecodeOpt = typer.Option(False, "--decode", help="Decode every image fully (finds truncated "
                         "files; slower). Default: headers only.")
SkipBadOpt = typer.Option(False, "--skip-bad", help="Leave bad images out and list them, "
                          "instead of stopping at the first.")


def steps_of(text: str | None) -> list[int] | None:
    """The value of ``--t-ts`` (``0,10,30``), checked; None when not given."""
    if text is None:
        return None
    from discli.infer.settings import parse_steps

    return parse_steps(text)


def scales_of(text: str) -> tuple[float, ...]:
    """The value of ``--scales`` (``0.75,1.0,1.25``), checked: a bad one is a usage error."""
    from discli.errors import UsageError

    if text.replace(" ", "") in ("1", "1.0"):
        return (1.0,)  # the default: no parsing, and no torch import before inputs are checked
    from discli.infer.runtime import parse_scales  # (torch: only once a command runs)

    try:
        return parse_scales(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


ScalesOpt = typer.Option("1.0", "--scales", help="Multi-scale testing: comma-separated image "
                         "scales whose probabilities are averaged, e.g. 0.5,0.75,1.0,1.25 "
                         "(each with its own feature inference).")
FlipOpt = typer.Option(False, "--flip/--no-flip", help="Also average the mirrored image's "
                       "prediction (mirrored back), at every scale.")
