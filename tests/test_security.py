"""Security: checkpoints never run pickle code, plugins come only from installed entry points
(and DIS_LOAD_PLUGINS restricts them), and no input can make dis write outside its outputs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from discli.infer.checkpoint import load_checkpoint
from discli.errors import IncompatibleError
from factories import save_tiny, tiny_model

DIS = shutil.which("dis") or str(Path(sys.executable).with_name("dis"))
CLASSES = ["background", "cat", "dog"]


def dis(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([DIS, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=full, cwd=cwd)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if pickle code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_model(3, 8), CLASSES)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), np.uint8)).save(path)
    return path


def evil_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    """Checkpoints carrying the payload: torch's zip format (inside an otherwise valid dis
    checkpoint) and a legacy raw pickle."""
    marker = folder / "pwned"
    state = load_checkpoint(good)
    state["classes"] = Payload(marker)
    zipped = folder / "zip.pth"
    torch.save(state, zipped)
    raw = folder / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump({"format": "dis-checkpoint", "x": Payload(marker)}, f, protocol=2)
    return {"zip": zipped, "raw": raw}


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_pickle_checkpoint_is_refused_in_the_library(tmp_path, checkpoint, kind):
    path = evil_checkpoints(tmp_path, checkpoint)[kind]
    with pytest.raises(IncompatibleError, match="refusing to load: the file needs arbitrary "
                                                "pickle code") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_pickle_checkpoint_is_refused_by_every_command(tmp_path, checkpoint, image):
    evil = evil_checkpoints(tmp_path, checkpoint)["zip"]
    manifest = tmp_path / "m.jsonl"
    header = {"format": "dis-manifest", "version": 1, "root": str(image.parent),
              "classes": CLASSES}
    manifest.write_text(json.dumps(header) + "\n"
                        + json.dumps({"id": "x", "image": "x.png", "tags": ["cat"]}) + "\n")
    labelled = tmp_path / "l.jsonl"
    labelled.write_text(manifest.read_text().replace('"tags"', '"labelmap": "x.png", "tags"'))
    runs = {
        "infer": ["infer", str(image), "-c", str(evil), "--json", "--device", "cpu"],
        "evaluate": ["evaluate", str(manifest), "-c", str(evil), "--device", "cpu"],
        "clean-tags": ["clean-tags", "run", str(manifest), "-c", str(evil), "-o",
                       str(tmp_path / "c.h5"), "--device", "cpu"],
        "finetune": ["finetune", "--labelled", str(labelled), "--tagged", str(manifest),
                     "--init", str(evil), "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--only", "estep", "--quiet"],
    }
    for name, args in runs.items():
        r = dis(*args, DIS_LOAD_PLUGINS=name)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 4, (name, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert lines[0] == (f"dis: error: {evil}: refusing to load: the file needs arbitrary "
                            f"pickle code (only weights_only checkpoints are accepted)"), lines[0]
        assert not (tmp_path / "pwned").exists(), name
    # a resumed pretrain reads <out>/pretrain/last.pth: a planted one is refused the same way
    (tmp_path / "run2" / "pretrain").mkdir(parents=True)
    shutil.copy(evil, tmp_path / "run2" / "pretrain" / "last.pth")
    r = dis("pretrain", "--labelled", labelled, "--out", tmp_path / "run2", "--device", "cpu",
            "--quiet", DIS_LOAD_PLUGINS="pretrain")
    assert r.returncode == 4 and "last.pth: refusing to load" in r.stderr, r.stderr
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- plugins


def fake_distribution(site: Path, marker: Path) -> None:
    """An installed distribution (a .dist-info on sys.path) whose dis.commands plugin module
    creates ``marker`` when imported."""
    (site / "evil_plugin.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef evil():\n    print('evil ran')\n")
    info = site / "evil_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dis.commands]\nevil = evil_plugin:evil\n")
    (info / "RECORD").write_text("")


def test_dis_load_plugins_restricts_what_is_imported(tmp_path):
    site, marker = tmp_path / "site", tmp_path / "imported"
    site.mkdir()
    fake_distribution(site, marker)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    r = dis("--help", PYTHONPATH=path, DIS_LOAD_PLUGINS="infer,plugins")
    assert r.returncode == 0 and "evil" not in r.stdout and "infer" in r.stdout
    assert "pretrain" not in r.stdout
    assert not marker.exists()  # a plugin that is not allowed is never even imported
    r = dis("evil", PYTHONPATH=path, DIS_LOAD_PLUGINS="infer")
    assert r.returncode == 2 and "No such command 'evil'" in r.stderr and not marker.exists()
    r = dis("plugins", "--json", PYTHONPATH=path, DIS_LOAD_PLUGINS="plugins")
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())
            if row["group"] == "dis.commands"}
    assert rows["evil"]["ok"] is False and "DIS_LOAD_PLUGINS" in rows["evil"]["error"]
    assert rows["plugins"]["ok"] and not marker.exists()
    r = dis("--help", PYTHONPATH=path, DIS_LOAD_PLUGINS="")
    assert r.returncode == 0 and "infer" not in r.stdout and not marker.exists()
    # unrestricted, an installed entry point is a plugin (that is what installing it means)
    r = dis("evil", PYTHONPATH=path)
    assert r.returncode == 0 and r.stdout.strip() == "evil ran" and marker.exists()


def test_modules_in_the_working_folder_are_not_plugins(tmp_path):
    """Launching dis from a folder holding look-alike modules imports none of them."""
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').close()\n"
    for package in ("discli", "dis_plugins", "plugins"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(code)
        (tmp_path / package / "infer.py").write_text(code)
    (tmp_path / "evil_plugin.py").write_text(code)
    r = dis("--help", cwd=tmp_path)
    assert r.returncode == 0 and "infer" in r.stdout and not marker.exists()


# ----------------------------------------------------------------------------- outputs


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_manifest_paths_never_make_dis_write_outside_its_output(tmp_path, checkpoint, image):
    """Absolute image paths, sub-folders, ids with dots: outputs land under --out only; '..'
    paths, unsafe ids and symlinked output sub-folders are refused before anything is written."""
    data = tmp_path / "data"
    (data / "deep" / "er").mkdir(parents=True)
    shutil.copy(image, data / "deep" / "er" / "a.png")
    header = {"format": "dis-manifest", "version": 1, "root": "data", "classes": CLASSES}
    records = [{"id": "a.b", "image": "deep/er/a.png"}, {"id": "abs", "image": str(image)}]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    out = tmp_path / "out"
    before = tree(tmp_path)
    r = dis("infer", good, "-c", checkpoint, "-o", out, "--device", "cpu", "-q",
            DIS_LOAD_PLUGINS="infer")
    assert r.returncode == 0, r.stderr
    created = tree(tmp_path) - before
    assert created and all(c == "out" or c.startswith("out/") for c in created), created
    assert {"out/a.b.png", "out/abs.png"} <= created

    for bad in ({"id": "x", "image": "../../../etc/passwd"}, {"id": "x", "image": "..\\..\\x"},
                {"id": "../x", "image": "deep/er/a.png"}, {"id": "/tmp/x", "image": "a.png"},
                {"id": ".hidden", "image": "a.png"}):
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(x) for x in [header, bad]) + "\n")
        before = tree(tmp_path)
        r = dis("infer", path, "-c", checkpoint, "-o", tmp_path / "out2", "--device", "cpu",
                DIS_LOAD_PLUGINS="infer")
        assert r.returncode == 3 and "bad.jsonl: line 2" in r.stderr, (bad, r.stderr)
        assert tree(tmp_path) == before, bad

    # a symbolic link inside the output folder pointing elsewhere is not followed
    (tmp_path / "in" / "sub").mkdir(parents=True)
    shutil.copy(image, tmp_path / "in" / "sub" / "y.png")
    (tmp_path / "elsewhere").mkdir()
    (out / "sub").symlink_to(tmp_path / "elsewhere")
    r = dis("infer", tmp_path / "in", "-c", checkpoint, "-o", out, "--device", "cpu",
            DIS_LOAD_PLUGINS="infer")
    assert r.returncode == 3 and "would write outside the output folder" in r.stderr
    assert not list((tmp_path / "elsewhere").iterdir())
