"""Overlays, legends and image grids (discli.infer.visual): exact pixel behaviour."""

import numpy as np
import pytest

from discli.errors import UsageError
from discli.infer.visual import colorize, grid, legend, overlay, palette


def test_overlay_blends_only_labelled_non_background_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    labelmap = np.zeros((6, 7), np.uint8)
    labelmap[1:3, 2:5] = 1
    labelmap[4, :] = 255  # void
    labelmap[5, 0] = 3
    out = overlay(image, labelmap, 0.25)
    untouched = (labelmap == 0) | (labelmap == 255)
    assert np.array_equal(out[untouched], image[untouched])  # background not darkened
    colours = palette()[labelmap].astype(np.float64)
    want = (0.75 * image + 0.25 * colours).round().astype(np.uint8)
    assert np.array_equal(out[~untouched], want[~untouched])
    assert np.array_equal(overlay(image, labelmap, 0.0), image)
    assert np.array_equal(overlay(image, labelmap, 1.0)[~untouched],
                          colorize(labelmap)[~untouched])
    # The library names its keyword; the command line, which shows cli_message(), the flag.
    with pytest.raises(UsageError, match="^opacity must be within 0..1") as caught:
        overlay(image, labelmap, 1.2)
    assert caught.value.cli_message().startswith("--opacity must be within 0..1")


def test_palette_is_voc():
    assert palette()[1].tolist() == [128, 0, 0] and palette()[15].tolist() == [192, 128, 128]
    assert palette()[255].tolist() == [224, 224, 192]


def test_legend_shows_every_class_colour():
    classes = ["background", "aeroplane", "bicycle", "bird", "boat"]
    image = np.asarray(legend(classes, width=160))
    colours = {tuple(c) for c in image.reshape(-1, 3).tolist()}
    for index in [*range(len(classes)), 255]:
        assert tuple(palette()[index].tolist()) in colours
    assert image.shape[1] == 160 and image.shape[0] > 2 * 18  # wrapped over several rows
    assert tuple(palette()[6].tolist()) not in colours  # only the classes asked for


def test_grid_keeps_aspect_ratio_and_labels_columns():
    wide = np.zeros((20, 80, 3), np.uint8)  # 4:1, one colour
    wide[:] = (10, 200, 250)
    tall = np.full((60, 30), 2, np.uint8)  # a labelmap 1:2
    figure = np.asarray(grid([[(wide, False), (colorize(tall), True)]],
                             ["input", "t_tr=30\nt_ts=10"], box=40, gap=4))
    cyan = np.argwhere((figure == (10, 200, 250)).all(axis=2))
    ys, xs = cyan[:, 0], cyan[:, 1]
    # the wide image: 40 x 10 (fitted to the 40-pixel box, aspect kept), in column 0
    assert xs.max() - xs.min() + 1 == 40 and ys.max() - ys.min() + 1 == 10
    green = np.argwhere((figure == palette()[2]).all(axis=2))
    assert np.ptp(green[:, 0]) + 1 == 40 and np.ptp(green[:, 1]) + 1 == 20
    assert green[:, 1].min() >= 4 + 40  # second column
    assert ys.min() > 20  # two lines of headings above the tiles ...
    assert (figure[:ys.min() - 4] < 100).all(axis=2).sum() > 30  # ... drawn in black


def test_infer_overlay_opacity(tmp_path, capsys):
    """`dis infer --overlay --opacity`: background pixels keep the image, predicted objects
    take ``opacity`` of their class colour."""
    from PIL import Image
    from factories import make_sample, save_tiny, trained_tiny
    from test_infer_cli import cli

    ckpt = save_tiny(tmp_path / "tiny.pt", trained_tiny())
    rng = np.random.default_rng(3)
    Image.fromarray(make_sample(rng, 48, 64)[0]).save(tmp_path / "a.png")
    shown = {}
    for opacity in ("0", "1"):
        out = tmp_path / f"out{opacity}"
        code, _, err = cli(capsys, "infer", str(tmp_path / "a.png"), "-c", str(ckpt), "--out",
                           str(out), "--overlay", "--opacity", opacity, "--device", "cpu", "-q")
        assert code == 0, err
        shown[opacity] = np.asarray(Image.open(out / "a_overlay.jpg").convert("RGB")).astype(int)
        labelmap = np.asarray(Image.open(out / "a.png"))
    image = np.asarray(Image.open(tmp_path / "a.png")).astype(int)
    objects = labelmap > 0
    assert objects.sum() > 50 and (~objects).sum() > 50
    assert abs(shown["0"].mean() - image.mean()) < 3  # nothing drawn
    for region in (~objects, objects):  # JPEG keeps region means
        want = np.where(region[..., None], colorize(labelmap), image) if region is objects \
            else image
        assert abs(shown["1"][region].mean() - want[region].mean()) < 4
    code, _, err = cli(capsys, "infer", str(tmp_path / "a.png"), "-c", str(ckpt), "--out",
                       str(tmp_path / "x"), "--overlay", "--opacity", "2", "--device", "cpu")
    assert code == 2 and "--opacity" in err
