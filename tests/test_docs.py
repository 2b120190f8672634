"""The README and docs/: relative links resolve, the README stays a short user's guide, and the
commands it shows name registered subcommands. Plain text parsing: no torch, nothing is run."""
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the text may run over a line break
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_and_code(text):
    """(prose with fenced blocks blanked, [(info string, block lines)]) of a markdown text."""
    prose, blocks, block, info = [], [], None, ""
    for line in text.split("\n"):
        if FENCE.match(line):
            if block is None:
                block, info = [], line.strip().strip("`~").strip()
            else:
                blocks.append((info, block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    seen, found = {}, set()
    for line in prose.split("\n"):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path):
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)
    return [m.group(1) for m in LINK.finditer(prose)]


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"studies.md", "method.md", "running.md", "plugins.md", "architecture.md"} <= names


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad, cache = [], {}
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def test_readme_keeps_the_two_commands_at_the_top():
    _, blocks = prose_and_code(README.read_text(encoding="utf-8"))
    info, first = blocks[0]
    assert info == "bash"
    assert [c for c in first if c.strip()] == [
        "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && dis demo --quick",
        "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[test]' && "
        "python -m pytest -q -n 2",
    ]


def registered_commands():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return set(project["entry-points"]["dis.commands"])


def test_readme_commands_are_registered():
    known = registered_commands()
    _, blocks = prose_and_code(README.read_text(encoding="utf-8"))
    used, bad = [], []
    for info, lines in blocks:
        if info.split()[:1] != ["bash"]:
            continue
        for line in lines:
            if not line.startswith("dis "):  # continuation lines are indented
                continue
            words = line.split()
            sub = next((w for w in words[1:] if not w.startswith("-")), None)
            used.append(sub)
            if sub not in known:
                bad.append(line.strip())
    assert used, "no `dis SUBCOMMAND` line found in the README's bash blocks"
    assert not bad, f"not registered in dis.commands {sorted(known)}: {bad}"


def readme_command_lines():
    """Every `dis ...` command of the README's bash blocks as its words (continuation lines
    joined, comments dropped)."""
    import shlex

    _, blocks = prose_and_code(README.read_text(encoding="utf-8"))
    commands = []
    for info, lines in blocks:
        if info.split()[:1] != ["bash"]:
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.split("\n"):
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                if words[:1] == ["dis"]:
                    commands.append(words[1:])
    return commands


def test_readme_commands_parse_with_help(capsys):
    """Each command's subcommand answers --help, and every option it uses is in that help."""
    from discli.cli.app import main

    checked = 0
    for words in readme_command_lines():
        path = []
        for word in words:  # `dis clean-tags export CACHE`: the subcommand path first
            if word.startswith("-"):
                break
            capsys.readouterr()
            if main([*path, word, "--help"]) != 0:
                break
            path.append(word)
        capsys.readouterr()
        assert main([*path, "--help"]) == 0, words
        help_text = capsys.readouterr().out
        options = [w.split("=")[0] for w in words if w.startswith("--")]
        missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", help_text)]
        assert not missing, f"dis {' '.join(words)}: {missing} not in `dis {' '.join(path)} --help`"
        checked += 1
    assert checked >= 10
