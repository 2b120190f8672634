"""Image, labelmap, VOC and SBD formats: round trips on generated files and the real VOC sample."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageFile

from discli.data.images import probe_image, read_image
from discli.data.manifest import read_manifest
from discli.data.prepare import prepare_voc
from discli.data.sbd import read_sbd_mat
from discli.data.labelmap import (check_pair, labelmap_tags, read_labelmap, voc_palette,
                                  write_palette_png)
from discli.data.voc import VOC_CLASSES
from discli.errors import BadInputError
from factories import bomb_png


def voc_sample() -> Path:
    """The real VOC pair in shared/fixtures: beside the repo's folder (CI) or in /work/shared."""
    for base in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        path = base / "fixtures" / "voc2012-sample" / "VOC2012"
        if path.is_dir():
            return path
    pytest.skip("shared/fixtures/voc2012-sample is not available")


# --- images ---------------------------------------------------------------------------------

def png_16bit_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0,
                                                                        0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))



def test_rgb_jpeg_and_png(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3) and np.array_equal(out, arr)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    assert read_image(tmp_path / "a.jpg").shape == (12, 17, 3)
    assert probe_image(tmp_path / "a.jpg") == (12, 17)


def test_cmyk_jpeg_converted(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    out = read_image(tmp_path / "red.jpg")
    assert out.shape == (16, 16, 3)
    assert np.allclose(out[8, 8], (255, 0, 0), atol=12)


def test_16bit_grey_scaled_not_clipped(tmp_path):
    grey = np.full((10, 10), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (10, 10, 3) and np.all(out == 128)


def test_16bit_rgb_png(tmp_path):
    rgb16 = np.zeros((9, 11, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32768, 0
    png_16bit_rgb(tmp_path / "c16.png", rgb16)
    out = read_image(tmp_path / "c16.png")
    assert out.shape == (9, 11, 3) and tuple(out[4, 5]) == (255, 128, 0)


def test_rgba_and_grey_and_palette(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (10, 200, 30, 255)  # opaque green on top, fully transparent black below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (10, 200, 30) and tuple(out[7, 7]) == (255, 255, 255)
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert np.all(read_image(tmp_path / "l.png") == 77)
    p = Image.new("P", (8, 8), 3)
    p.putpalette(voc_palette())
    p.save(tmp_path / "p.png")
    assert tuple(read_image(tmp_path / "p.png")[0, 0]) == tuple(voc_palette()[9:12])


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    Image.new("RGB", (20, 10), (9, 9, 9)).save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "o.jpg").shape == (20, 10, 3)
    assert probe_image(tmp_path / "o.jpg") == (20, 10)


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "0 bytes"),
    (lambda p: p.write_bytes(b"this is not an image at all"), "not a decodable"),
])
def test_bad_image_files(tmp_path, make, needle):
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(BadInputError, match=needle) as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image(tmp_path, suffix):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"t{suffix}"
    Image.fromarray(arr).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        read_image(path)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    bomb_png(path)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for fn in (read_image, probe_image):
        with pytest.raises(BadInputError, match="20000x20000|decompression bomb"):
            fn(path)
    with pytest.raises(BadInputError, match="decompression bomb"):
        read_image(path, max_pixels=100)  # the limit is configurable


def test_tiny_image_refused_unless_allowed(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "px.gif")
    with pytest.raises(BadInputError, match="too small"):
        read_image(tmp_path / "px.gif")
    assert read_image(tmp_path / "px.gif", min_side=1).shape == (1, 1, 3)


# --- labelmaps ------------------------------------------------------------------------------

def test_voc_palette():
    pal = voc_palette()
    assert len(pal) == 768
    assert pal[:6] == [0, 0, 0, 128, 0, 0] and pal[15 * 3:16 * 3] == [192, 128, 128]
    assert pal[255 * 3:] == [224, 224, 192]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"


def test_real_voc_sample_round_trip(tmp_path):
    voc = voc_sample()
    png = voc / "SegmentationClass" / "2007_000033.png"
    values = read_labelmap(png, 21)
    assert values.dtype == np.uint8 and values.shape == (366, 500)
    labels, counts = np.unique(values, return_counts=True)
    assert dict(zip(labels.tolist(), counts.tolist())) == {0: 143868, 1: 30937, 255: 8195}
    assert labelmap_tags(values, VOC_CLASSES) == ["aeroplane"]
    check_pair(voc / "JPEGImages" / "2007_000033.jpg", png, 21, decode=True)

    write_palette_png(tmp_path / "copy.png", values)
    again = read_labelmap(tmp_path / "copy.png", 21)
    assert np.array_equal(again, values)
    original, written = Image.open(png).getpalette(), Image.open(tmp_path / "copy.png").getpalette()
    for index in (0, 1, 255):
        assert written[3 * index:3 * index + 3] == original[3 * index:3 * index + 3]
    assert written == original  # the whole VOC colour map, in fact


def test_plain_index_image_accepted(tmp_path):
    arr = np.array([[0, 1, 2], [255, 20, 0]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "l.png")  # mode L
    assert np.array_equal(read_labelmap(tmp_path / "l.png", 21), arr)


def test_labelmap_errors(tmp_path):
    Image.new("RGB", (4, 4), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(BadInputError, match="RGB image, not a palette") as info:
        read_labelmap(tmp_path / "rgb.png", 21)
    assert "rgb.png" in str(info.value)
    write_palette_png(tmp_path / "big.png", np.array([[0, 7, 200]], dtype=np.uint8))
    with pytest.raises(BadInputError, match="7, 200 outside 0..5"):
        read_labelmap(tmp_path / "big.png", 6)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(BadInputError, match="unsupported labelmap file type"):
        read_labelmap(tmp_path / "x.jpg", 21)
    Image.new("RGB", (5, 4)).save(tmp_path / "im.jpg")
    write_palette_png(tmp_path / "lm.png", np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(BadInputError, match="labelmap is 6x4 but its image im.jpg is 5x4"):
        check_pair(tmp_path / "im.jpg", tmp_path / "lm.png", 21)


def save_sbd_mat(path: Path, seg: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg.astype(np.uint8),
                                      "Boundaries": np.zeros((1, 1)),
                                      "CategoriesPresent": np.unique(seg[seg > 0])}})


def test_sbd_mat_round_trip(tmp_path):
    seg = np.zeros((7, 9), dtype=np.uint8)
    seg[2:5, 3:8] = 15
    seg[0, 0] = 3
    save_sbd_mat(tmp_path / "cls" / "a.mat", seg)
    assert np.array_equal(read_sbd_mat(tmp_path / "cls" / "a.mat"), seg)
    assert np.array_equal(read_labelmap(tmp_path / "cls" / "a.mat", 21), seg)
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(BadInputError, match="no GTcls.Segmentation"):
        read_sbd_mat(tmp_path / "other.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk" * 10)
    with pytest.raises(BadInputError, match="not a readable MATLAB file"):
        read_sbd_mat(tmp_path / "junk.mat")
    # an empty struct array with the right field: an IndexError before
    scipy.io.savemat(tmp_path / "empty.mat", {"GTcls": np.zeros((0,), [("Segmentation", "O")])})
    with pytest.raises(BadInputError, match="no GTcls.Segmentation"):
        read_sbd_mat(tmp_path / "empty.mat")


def test_a_split_list_naming_an_image_twice_names_the_list(tmp_path):
    from discli.data.voc import read_id_list

    (tmp_path / "train.txt").write_text("a_1\n\nb_2\na_1\n")
    with pytest.raises(BadInputError, match=r"train.txt: line 4: duplicate id 'a_1' \(first on "
                                            r"line 1\)"):
        read_id_list(tmp_path / "train.txt")
    (tmp_path / "ok.txt").write_text("a_1\nb_2 extra\n")
    assert read_id_list(tmp_path / "ok.txt") == ["a_1", "b_2"]


# --- VOCdevkit and SBD trees -> manifests -----------------------------------------------------

def labelmap_for(i: int, shape=(12, 16)) -> np.ndarray:
    lm = np.zeros(shape, dtype=np.uint8)
    lm[2:8, 3:10] = 1 + i % 20
    lm[2, 3:10] = 255
    return lm


def make_voc(root: Path, splits: dict[str, list[str]], shape=(12, 16)) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = sorted({i for v in splits.values() for i in v})
    for n, image_id in enumerate(ids):
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", shape[::-1], (n * 10, 50, 90)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", labelmap_for(n, shape))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, members in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{m}\n" for m in members))
    return voc


def make_sbd(root: Path, splits: dict[str, list[str]], shape=(12, 16)) -> Path:
    ds = root / "benchmark_RELEASE" / "dataset"
    for split, members in splits.items():
        for image_id in members:
            seg = np.zeros(shape, dtype=np.uint8)
            seg[5:, :4] = 12  # a dog
            save_sbd_mat(ds / "cls" / f"{image_id}.mat", seg)
            (ds / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", shape[::-1], (1, 2, 3)).save(ds / "img" / f"{image_id}.jpg")
        (ds / f"{split}.txt").write_text("".join(f"{m}\n" for m in members))
    return ds


def test_prepare_voc_with_sbd_train_aug(tmp_path):
    voc = make_voc(tmp_path / "data", {"train": ["a", "b"], "val": ["c"],
                                       "trainval": ["a", "b", "c"]})
    make_sbd(tmp_path / "data", {"train": ["b", "d"], "val": ["c", "e"]})
    report = prepare_voc(tmp_path / "data", tmp_path / "out", sbd=tmp_path / "data")
    assert set(report["manifests"]) == {"train", "val", "trainval", "sbd_train", "sbd_val",
                                        "train_aug"}
    assert report["bad"] == []
    train = read_manifest(tmp_path / "out" / "train.jsonl")
    assert train.root == voc and [r.id for r in train.records] == ["a", "b"]
    assert train.records[0].labelmap == "SegmentationClass/a.png"
    assert train.records[0].tags == [VOC_CLASSES[1]] and train.records[0].tag_source == "pixels"
    aug = read_manifest(tmp_path / "out" / "train_aug.jsonl")
    by_id = {r.id: r for r in aug.records}
    assert set(by_id) == {"a", "b", "d", "e"}  # c is VOC val: never in train_aug
    assert by_id["b"].labelmap.endswith("SegmentationClass/b.png")  # VOC's own labels win
    assert by_id["d"].labelmap.endswith("cls/d.mat") and by_id["d"].tags == ["dog"]
    assert by_id["d"].image.endswith("img/d.jpg")  # not in VOC JPEGImages: SBD's image
    for rec in aug.records:
        assert read_labelmap(aug.labelmap_path(rec), 21).shape == (12, 16)
        assert aug.image_path(rec).is_file()


def test_prepare_voc_bad_items_and_skip_bad(tmp_path):
    voc = make_voc(tmp_path, {"train": ["a", "b", "c", "d"]})
    write_palette_png(voc / "SegmentationClass" / "b.png", np.zeros((5, 5), dtype=np.uint8))
    (voc / "JPEGImages" / "c.jpg").write_bytes(b"")
    (voc / "SegmentationClass" / "d.png").unlink()
    with pytest.raises(BadInputError, match="b.png: labelmap is 5x5"):
        prepare_voc(tmp_path, tmp_path / "out")
    report = prepare_voc(tmp_path, tmp_path / "out", skip_bad=True)
    assert [Path(b["path"]).name for b in report["bad"]] == ["b.png", "c.jpg", "d.png"]
    assert report["manifests"]["train"]["records"] == 1


def test_prepare_voc_synthetic_class_subset(tmp_path):
    make_voc(tmp_path, {"train": ["a"]})  # the label value 1 fits a 2-class list
    report = prepare_voc(tmp_path, tmp_path / "out", classes=["background", "aeroplane"])
    assert report["manifests"]["train"]["tag_counts"] == {"aeroplane": 1}
    shutil.rmtree(tmp_path / "out")
    make_voc(tmp_path, {"train": ["a", "b"]})  # b has value 2: outside a 2-class list
    with pytest.raises(BadInputError, match="outside 0..1"):
        prepare_voc(tmp_path, tmp_path / "out", classes=["background", "aeroplane"])
