import json
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import typer
from typer.testing import CliRunner

import discli.entrypoints as entrypoints
from discli import __version__
from discli.cli import build_app, main

runner = CliRunner()


def fake_command(name: str = typer.Option("world")) -> None:
    """A command from a third-party package."""
    typer.echo(f"hello {name}")


def _with_extra(monkeypatch, *extra: EntryPoint) -> None:
    real = entrypoints.entry_points

    def patched(group: str):
        return real(group) + [ep for ep in extra if ep.group == group]

    monkeypatch.setattr(entrypoints, "entry_points", patched)


def test_help_and_version():
    result = runner.invoke(build_app(), ["--help"])
    assert result.exit_code == 0 and "plugins" in result.output
    result = runner.invoke(build_app(), ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_plugins_lists_builtins_with_distribution():
    result = runner.invoke(build_app(), ["plugins", "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.output.splitlines()]
    names = {(r["group"], r["name"]): r for r in rows}
    assert ("dis.commands", "plugins") in names
    assert ("dis.backbones", "resnet101") in names
    assert names[("dis.backbones", "tiny")]["distribution"] == "dis-seg"
    assert names[("dis.backbones", "tiny")]["version"] == __version__


def test_fake_entry_point_shows_up(monkeypatch):
    _with_extra(monkeypatch, EntryPoint("hello", f"{__name__}:fake_command", "dis.commands"))
    app = build_app()
    result = runner.invoke(app, ["hello", "--name", "dis"])
    assert result.exit_code == 0 and result.output.strip() == "hello dis"
    result = runner.invoke(app, ["plugins", "--json"])
    assert any(json.loads(line)["name"] == "hello" for line in result.output.splitlines())


def test_broken_plugin_warns_and_cli_still_works(monkeypatch, capsys):
    _with_extra(monkeypatch, EntryPoint("broken", "no_such_module_xyz:cmd", "dis.commands"))
    code = main(["plugins", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    warnings = [line for line in captured.err.splitlines() if "broken" in line]
    assert len(warnings) == 1 and warnings[0].startswith("dis: warning: plugin 'broken'")
    assert "ModuleNotFoundError" in warnings[0]
    assert any(json.loads(line)["name"] == "plugins" for line in captured.out.splitlines())


def test_load_plugins_env_restricts(monkeypatch):
    _with_extra(monkeypatch, EntryPoint("hello", f"{__name__}:fake_command", "dis.commands"))
    monkeypatch.setenv("DIS_LOAD_PLUGINS", "plugins")
    result = runner.invoke(build_app(), ["hello"])
    assert result.exit_code != 0


def test_unknown_command_is_usage_error():
    assert main(["no-such-command"]) == 2


@pytest.mark.skipif(shutil.which("dis") is None, reason="console script not installed")
def test_console_script():
    out = subprocess.run(["dis", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "plugins" in out.stdout
    out = subprocess.run(["dis", "plugins"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resnet101" in out.stdout and "dis-seg" in out.stdout
    out = subprocess.run(["dis", "--version"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"dis {__version__}"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "discli", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and __version__ in out.stdout


def test_library_errors_name_keywords_and_the_cli_names_flags(tmp_path, capsys):
    """A library message names an option by its Python keyword; `dis` prints the flag."""
    from discli.errors import IncompatibleError, UsageError
    from discli.infer.settings import parse_steps

    err = IncompatibleError("made elsewhere; pass {opt:overwrite=True}, {opt:device=cpu}, "
                            "{opt:steps/step=2} or another {opt:out}", tmp_path / "x.h5")
    assert str(err) == (f"{tmp_path / 'x.h5'}: made elsewhere; pass overwrite=True, device=cpu, "
                        "steps=2 or another out")
    assert err.cli_message() == (f"{tmp_path / 'x.h5'}: made elsewhere; pass --overwrite, "
                                 "--device cpu, --step 2 or another --out")
    with pytest.raises(UsageError, match=r"^t_ts: expected comma-separated integers"):
        parse_steps("1,x")
    code = main(["evaluate", str(tmp_path / "m.jsonl"), "-c", str(tmp_path / "c.pth"),
                 "--t-ts", "1,x"])
    assert code == 2
    assert "--t-ts: expected comma-separated integers, got '1,x'" in capsys.readouterr().err


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_texts_survive_rich_markup():
    """Typer renders help through rich markup, which silently drops a bracketed word such as
    [names] or [train.<group>]; every built-in text must come out as written (escape with \\[)."""
    from rich.text import Text

    eaten = []
    for path, command in _commands(typer.main.get_command(build_app())):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            if Text.from_markup(text).plain != text.replace("\\[", "["):
                eaten.append((" ".join(path), text[:80]))
    assert not eaten
    out = runner.invoke(build_app(), ["config", "show", "--help"], terminal_width=200).output
    assert "[train.<group>]" in out and "[finetune]" in out


def test_help_paragraphs_reflow_to_the_terminal(capsys, monkeypatch):
    """The source wraps docstrings at 100 columns; `dis CMD --help` joins those breaks so that
    rich wraps each paragraph to the terminal (no ragged lines at 80 columns), keeps the
    paragraphs, and leaves a click \\b paragraph as written."""
    from discli.cli.app import unwrap_help

    app = typer.Typer()

    @app.command()
    def fake() -> None:
        """First line
        goes on.

        Second paragraph,
        two lines.

        \b
        kept
        as is
        """

    command = unwrap_help(typer.main.get_command(app))
    assert command.help == "First line goes on.\n\nSecond paragraph, two lines.\n\n\b\nkept\nas is"
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Each round: E-step (inferred labelmaps and cleaned tags -> round-N/cache.h5)," in out
    assert "then M-step. Re-running continues" in out  # one paragraph, wrapped by rich at 80
