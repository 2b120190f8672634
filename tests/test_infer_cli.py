"""`dis infer` through the installed console script, on a tiny trained checkpoint.

The checkpoint trained for a few seconds on a synthetic labelled set comes from factories.py; the
fixtures and runners here (``tiny_checkpoint``, ``one_thread``, ``cli``, ``dis``) are shared with
test_evaluate.py, test_clean_tags.py and others.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from discli.data.dataset import normalize
from discli.data.labelmap import voc_palette
from factories import (CLASSES, make_sample, one_thread, save_tiny, trained_tiny,  # noqa: F401
                       write_dataset)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", trained_tiny())


def dis(*args: str, stdin: str | None = None, shell: bool = False,
        plugins: str = "infer,evaluate,clean-tags") -> subprocess.CompletedProcess:
    """Run the installed console script (only our plugins load: faster start)."""
    env = {**os.environ, "DIS_LOAD_PLUGINS": plugins, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("dis")
    cmd = [str(exe) if exe.exists() else "dis", *args]
    return subprocess.run(" ".join(cmd) if shell else cmd, input=stdin, capture_output=True,
                          text=True, timeout=120, env=env, shell=shell)


def cli(capsys, *args: str, stdin: str | None = None, monkeypatch=None
        ) -> tuple[int, str, str]:
    """Run `dis ARGS` in this process (fast); returns (exit code, stdout, stderr)."""
    from discli.cli.app import main

    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a": (40, 48), "b": (40, 48), "c": (33, 57)}.items():
        Image.fromarray(make_sample(rng, h, w)[0]).save(root / f"{name}.png")
    (root / "sub").mkdir()
    Image.fromarray(make_sample(rng, 36, 36)[0]).save(root / "sub" / "d.jpg")
    return root


def test_trained_checkpoint_is_not_constant(tiny_checkpoint, images):
    from discli.infer.checkpoint import load_model
    from discli.data.images import read_image
    from discli.infer.loop import infer

    model, _ = load_model(tiny_checkpoint)
    preds = infer(model, normalize(read_image(images / "a.png"))[None], 0).labelmap
    assert len(torch.unique(preds)) > 1


def test_infer_folder_writes_outputs_at_image_size(tiny_checkpoint, images, tmp_path):
    out = tmp_path / "out"
    r = dis("infer", str(images), "-c", str(tiny_checkpoint), "--out", str(out), "--overlay",
            "--json", "--device", "cpu", "--t-ts", "2", "-b", "2", "--probs",
            str(tmp_path / "p.h5"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(s["id"] for s in lines) == ["a", "b", "c", "sub/d"]
    assert all(not s["skipped"] and s["size"] for s in lines)
    sizes = {"a": (48, 40), "b": (48, 40), "c": (57, 33), "sub/d": (36, 36)}
    for image_id, size in sizes.items():
        with Image.open(out / f"{image_id}.png") as im:
            assert im.mode == "L" and im.size == size
            index = np.asarray(im)
        with Image.open(out / f"{image_id}_color.png") as im:
            assert im.mode == "P" and im.size == size
            assert im.getpalette()[:9] == voc_palette()[:9]
            assert np.array_equal(np.asarray(im), index)
        with Image.open(out / f"{image_id}_overlay.jpg") as im:
            assert im.mode == "RGB" and im.size == size
        assert index.max() < len(CLASSES)
    with h5py.File(tmp_path / "p.h5") as h5:
        assert json.loads(h5.attrs["classes"]) == CLASSES
        g = h5["entries"]["sub%2Fd"]
        assert g.attrs["id"] == "sub/d" and g["probs"].shape == (3, 36, 36)
        assert g["tag_probs"].shape == (3,)
        probs = h5["entries"]["c"]["probs"][()].astype(np.float32)
        assert np.allclose(probs.sum(axis=0), 1, atol=1e-2)
    with Image.open(out / "c.png") as im:
        # probabilities are stored as float16: near-ties may flip
        assert (np.asarray(im) == probs.argmax(axis=0)).mean() > 0.98
    assert not list(out.rglob(".*.tmp*"))


def test_batching_does_not_change_results(tiny_checkpoint, images, tmp_path, capsys):
    outs = []
    for bs in ("1", "4"):
        out = tmp_path / bs
        code, _, err = cli(capsys, "infer", str(images), "-c", str(tiny_checkpoint), "--out",
                           str(out), "--device", "cpu", "--t-ts", "3", "-b", bs, "-q")
        assert code == 0, err
        outs.append({p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))})
    assert outs[0].keys() == outs[1].keys()
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_several_t_ts_write_one_folder_each(tiny_checkpoint, images, tmp_path, capsys):
    """`--t-ts 0,3` as for evaluate: t0/ and t3/ hold what `--t-ts 0` and `--t-ts 3` write."""
    code, out, err = cli(capsys, "infer", str(images), "-c", str(tiny_checkpoint), "--out",
                         str(tmp_path / "both"), "--device", "cpu", "--t-ts", "0,3", "--json",
                         "-q")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted({line["t_ts"] for line in lines}) == [0, 3]
    for t in (0, 3):
        code, _, err = cli(capsys, "infer", str(images), "-c", str(tiny_checkpoint), "--out",
                           str(tmp_path / f"single{t}"), "--device", "cpu", "--t-ts", str(t),
                           "-q")
        assert code == 0, err
        single = sorted((tmp_path / f"single{t}").glob("*.png"))
        assert single and [p.name for p in single] == sorted(
            p.name for p in (tmp_path / "both" / f"t{t}").glob("*.png"))
        assert all(np.array_equal(np.asarray(Image.open(p)),
                                  np.asarray(Image.open(tmp_path / "both" / f"t{t}" / p.name)))
                   for p in single)
    code, _, err = cli(capsys, "infer", str(images), "-c", str(tiny_checkpoint), "--probs",
                       str(tmp_path / "p.h5"), "--device", "cpu", "--t-ts", "0,3")
    assert code == 2 and "one t_ts" in err


def test_stdin_list_through_console_script(tiny_checkpoint, images, tmp_path):
    out = tmp_path / "out"
    paths = f"{images / 'a.png'}\n{images / 'c.png'}\n"
    r = dis("infer", "-", "-c", str(tiny_checkpoint), "-o", str(out), "--json", "--device",
            "cpu", stdin=paths)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == ["a", "c"]
    assert (out / "a.png").is_file() and (out / "c_color.png").is_file()


def test_resume_and_settings_guard(tiny_checkpoint, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    paths = f"{images / 'a.png'}\n{images / 'c.png'}\n"
    args = ("infer", "-", "-c", str(tiny_checkpoint), "-o", str(out), "--device", "cpu")

    def run(*extra):
        code, stdout, err = cli(capsys, *args, *extra, stdin=paths, monkeypatch=monkeypatch)
        return code, [json.loads(x) for x in stdout.splitlines()], err

    code, lines, err = run("--json")
    assert code == 0 and [x["skipped"] for x in lines] == [False, False], err
    code, lines, _ = run("--json")
    assert code == 0 and all(x["skipped"] for x in lines)
    (out / "c_color.png").unlink()  # incomplete outputs are redone
    code, lines, _ = run("--json")
    assert {x["id"]: x["skipped"] for x in lines} == {"a": True, "c": False}
    # other settings into the same folder: refused (exit 4) unless --overwrite
    code, _, err = run("--t-ts", "5")
    assert code == 4 and err.startswith("dis: error:") and str(out) in err
    code, lines, _ = run("--t-ts", "5", "--overwrite", "--json")
    assert code == 0 and not any(x["skipped"] for x in lines)


def test_output_folder_inside_the_input_folder(tiny_checkpoint, images, tmp_path, capsys):
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    for _ in range(2):  # the second run must not take the first run's outputs for inputs
        code, _, err = cli(capsys, "infer", str(folder), "-c", str(tiny_checkpoint), "-o",
                           str(folder / "pred"), "--device", "cpu", "-q")
        assert code == 0, err
    assert sorted(p.name for p in (folder / "pred").glob("*.png") if "_" not in p.name) == \
        ["a.png", "b.png", "c.png"]


def test_manifest_input(tiny_checkpoint, tmp_path, capsys):
    manifest = write_dataset(tmp_path / "data", [(32, 40), (40, 32)])
    out = tmp_path / "out"
    code, _, err = cli(capsys, "infer", str(manifest), "-c", str(tiny_checkpoint), "-o",
                       str(out), "-q", "--device", "cpu")
    assert code == 0, err
    with Image.open(out / "img001.png") as im:
        assert im.size == (32, 40)


def test_ids_cannot_escape_the_output_folder(tmp_path):
    from discli.errors import BadInputError
    from discli.infer.inputs import safe_join

    out = tmp_path / "out"
    out.mkdir()
    assert safe_join(out, "a/b.png") == out / "a" / "b.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/x.png", "", "a//b.png"):
        with pytest.raises(BadInputError):
            safe_join(out, bad)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(BadInputError):
        safe_join(out, "link/x.png")


def test_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    def run(*args):
        return cli(capsys, "infer", *args, "-c", str(tiny_checkpoint), "--device", "cpu")

    code, _, err = run(str(tmp_path / "missing.png"), "--json")
    assert code == 3 and len(err.strip().splitlines()) == 1 and "missing.png" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(str(bad), "--json")
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("dis: error:") and "bad.png" in last
    code, _, err = run(str(bad))
    assert code == 2  # nothing to write


def test_size_batches_groups_equal_sizes():
    from discli.infer.runtime import size_batches

    items = [(1, "a"), (2, "b"), (1, "c"), (1, "d"), (3, "e"), (2, "f")]
    batches = list(size_batches(items, lambda x: (x[0],), 2))
    assert all(len({x[0] for x in b}) == 1 for b in batches)
    assert sorted(x for b in batches for x in b) == sorted(items)
    assert all(len(b) <= 2 for b in batches)
    bounded = list(size_batches([(i, str(i)) for i in range(10)], lambda x: (x[0],), 4,
                                max_pending=3))
    assert sum(len(b) for b in bounded) == 10


def test_scales_and_flip(tiny_checkpoint, images, tmp_path, capsys):
    """--scales 1.0 is today's output; with --flip a mirrored image gives the mirrored
    labelmap; other views redo a folder's outputs."""
    mirrored = tmp_path / "in"
    mirrored.mkdir()
    rgb = np.asarray(Image.open(images / "c.png"))
    Image.fromarray(rgb).save(mirrored / "c.png")
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(mirrored / "m.png")

    def run(out, *extra):
        code, _, err = cli(capsys, "infer", str(mirrored), "-c", str(tiny_checkpoint), "--out",
                           str(out), "--device", "cpu", "--t-ts", "3", "-q", *extra)
        assert code == 0, err
        return {p.stem: np.asarray(Image.open(p)) for p in out.glob("?.png")}

    plain, single = run(tmp_path / "plain"), run(tmp_path / "single", "--scales", "1.0")
    assert all(np.array_equal(plain[k], single[k]) for k in ("c", "m"))
    multi = run(tmp_path / "multi", "--scales", "0.75,1.0,1.5", "--flip")
    assert np.array_equal(multi["m"], multi["c"][:, ::-1])
    assert not np.array_equal(multi["c"], plain["c"])
    again = run(tmp_path / "plain", "--scales", "0.75,1.0,1.5", "--flip", "--overwrite")
    assert np.array_equal(again["c"], multi["c"])  # redone with the new views
