"""Bad input through the installed console script: one line naming the file, exit 3, no traceback.

Each case builds a small input, runs ``dis prepare-idw`` / ``dis prepare-voc`` as a user would,
and checks the contract; with ``--skip-bad`` the same input succeeds and lists what was left out.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from discli.data.labelmap import write_palette_png
from factories import bomb_png, solid_image

DIS = shutil.which("dis")
pytestmark = pytest.mark.skipif(DIS is None, reason="the dis console script is not installed")
# Only the data commands: a half-written plugin of another command must not add warning lines.
ENV = {**os.environ, "DIS_LOAD_PLUGINS": "prepare-idw,prepare-voc,synth"}


def dis(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DIS, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120)


def assert_bad_input(result: subprocess.CompletedProcess, filename: str, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dis: error: ") and filename in lines[0] and needle in lines[0], \
        lines[0]


def rgb(path: Path, size=(20, 16)) -> Path:
    return solid_image(path, size, (200, 30, 30))


def captions(folder: Path, *images: str) -> Path:
    path = folder / "caps.jsonl"
    path.write_text("".join(json.dumps({"image": i, "caption": "a cat"}) + "\n" for i in images))
    return path


def truncated(path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    path.write_bytes(path.read_bytes()[:400])



IMAGE_CASES = {
    "missing": (lambda p: None, "image not found"),
    "zero-byte": (lambda p: p.write_bytes(b""), "0 bytes"),
    "undecodable": (lambda p: p.write_bytes(b"GIF89a garbage garbage"), "not a decodable image"),
    "truncated": (truncated, "truncated or corrupt"),
    "bomb": (bomb_png, "decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_through_prepare_idw(tmp_path, case):
    make, needle = IMAGE_CASES[case]
    rgb(tmp_path / "good.jpg")
    make(tmp_path / "bad.png")
    src = captions(tmp_path, "good.jpg", "bad.png")
    assert_bad_input(dis("prepare-idw", src, "--out", tmp_path / "m.jsonl"), "bad.png", needle)
    assert not (tmp_path / "m.jsonl").exists()
    ok = dis("prepare-idw", src, "--out", tmp_path / "m.jsonl", "--skip-bad", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["records"] == 1 and len(report["bad"]) == 1
    assert report["bad"][0]["path"].endswith("bad.png") and needle in report["bad"][0]["problem"]


def test_caption_file_not_utf8(tmp_path):
    rgb(tmp_path / "pics" / "a.jpg")
    (tmp_path / "pics" / "a.txt").write_bytes("Un chat allongé".encode("latin-1"))
    assert_bad_input(dis("prepare-idw", tmp_path / "pics", "-o", tmp_path / "m.jsonl"), "a.txt",
                     "not UTF-8")
    src = tmp_path / "caps.jsonl"
    src.write_bytes(b'{"image": "pics/a.jpg", "caption": "caf\xe9"}\n')
    assert_bad_input(dis("prepare-idw", src, "-o", tmp_path / "m.jsonl"), "caps.jsonl",
                     "line 1: not UTF-8")


def test_missing_caption_input(tmp_path):
    assert_bad_input(dis("prepare-idw", tmp_path / "nope.jsonl", "-o", tmp_path / "m.jsonl"),
                     "nope.jsonl", "caption input not found")


HEADER = {"format": "dis-manifest", "version": 1, "root": ".", "classes": ["background", "cat"]}
MANIFEST_CASES = {
    "empty-line": ([HEADER, ""], "line 2: empty line"),
    "malformed": ([HEADER, '{"id": "a", '], "line 2: malformed JSON"),
    "unknown-class": ([HEADER, {"id": "a", "image": "a.jpg", "tags": ["zebra"]}],
                      "line 2: unknown class 'zebra'"),
    "escaping-root": ([HEADER, {"id": "a", "image": "../../etc/passwd"}],
                      "escapes the manifest root"),
    "version": ([{**HEADER, "version": 9}], "version 9 is not supported"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_through_prepare_idw(tmp_path, case):
    lines, needle = MANIFEST_CASES[case]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    result = dis("prepare-idw", path, "--format", "manifest", "-o", tmp_path / "m.jsonl")
    assert_bad_input(result, "in.jsonl", needle)


def voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for name in ("a", "b"):
        rgb(voc / "JPEGImages" / f"{name}.jpg", size=(10, 8))
        write_palette_png(voc / "SegmentationClass" / f"{name}.png", np.ones((8, 10), np.uint8))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    return voc


LABELMAP_CASES = {
    "size": (lambda p: write_palette_png(p, np.zeros((3, 3), np.uint8)), "labelmap is 3x3"),
    "values": (lambda p: write_palette_png(p, np.full((8, 10), 40, np.uint8)),
               "value(s) 40 outside 0..20"),
    "rgb": (lambda p: Image.new("RGB", (10, 8), (128, 0, 0)).save(p),
            "not a palette or greyscale index PNG"),
}


@pytest.mark.parametrize("case", sorted(LABELMAP_CASES))
def test_bad_labelmap_through_prepare_voc(tmp_path, case):
    make, needle = LABELMAP_CASES[case]
    voc = voc_tree(tmp_path)
    make(voc / "SegmentationClass" / "b.png")
    assert_bad_input(dis("prepare-voc", tmp_path, "--out", tmp_path / "out"), "b.png", needle)
    ok = dis("prepare-voc", tmp_path, "--out", tmp_path / "out", "--skip-bad", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["manifests"]["train"]["records"] == 1 and len(report["bad"]) == 1


def test_cmyk_and_16bit_inputs_are_converted(tmp_path):
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((12, 16), 40000, np.uint16)).save(tmp_path / "grey16.png")
    src = captions(tmp_path, "cmyk.jpg", "grey16.png")
    result = dis("prepare-idw", src, "-o", "-", "--classes", "cat,dog")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert json.loads(lines[0])["classes"] == ["background", "cat", "dog"]
    assert [json.loads(x)["tags"] for x in lines[1:]] == [["cat"], ["cat"]]


def test_synth_command(tmp_path):
    result = dis("synth", tmp_path / "b", "--n-labelled", "2", "--n-tagged", "3", "--n-test", "2",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["manifests"]["tagged"]).is_file()
    again = dis("synth", tmp_path / "b", "--n-labelled", "2")
    assert again.returncode == 2 and "pass --overwrite to replace it" in again.stderr
    assert dis("synth", tmp_path / "b", "--n-labelled", "2", "--force").returncode == 0
