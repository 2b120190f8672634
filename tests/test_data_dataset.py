"""SegDataset, transforms and collation: shapes, dtypes, padding values, DataLoader workers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from discli.data.dataset import (IMAGENET_MEAN, SegDataset, collate, denormalize, eval_transform,
                                 normalize, train_transform)
from discli.data.images import read_image
from discli.data.manifest import Manifest, Record
from discli.data.labelmap import write_palette_png
from discli.errors import BadInputError

CLASSES = ["background", "cat", "dog"]


def make_set(root: Path, sizes=((20, 30), (33, 17), (16, 16))) -> Manifest:
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lm = np.zeros((h, w), dtype=np.uint8)
        lm[h // 4:h // 2, w // 4:w // 2] = 1 + i % 2
        lm[0, 0] = 255
        write_palette_png(root / f"{i}_lm.png", lm)
        has = i != 2  # the last one is tagged only
        records.append(Record(str(i), f"{i}.png", f"{i}_lm.png" if has else None,
                              [CLASSES[1 + i % 2]], "pixels" if has else "caption"))
    return Manifest(CLASSES, records, root)


def test_normalize_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    back = (denormalize(x) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, img)
    batch = normalize(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(2, 1, 1, 1))
    assert torch.allclose(batch[0], x)
    grey = np.full((2, 2, 3), np.round(np.array(IMAGENET_MEAN) * 255), dtype=np.uint8)
    assert normalize(grey).abs().max() < 0.01  # the mean maps to ~0: padding with 0 = mean


def test_items_eval(tmp_path):
    ds = SegDataset(make_set(tmp_path))
    item = ds[0]
    assert item["id"] == "0" and item["index"] == 0 and item["size"] == (20, 30)
    assert item["image"].shape == (3, 20, 30) and item["image"].dtype == torch.float32
    assert item["labelmap"].shape == (20, 30) and item["labelmap"].dtype == torch.int64
    assert set(item["labelmap"].unique().tolist()) == {0, 1, 255}
    assert item["tags"].tolist() == [1.0, 1.0, 0.0] and item["has_labelmap"] is True
    tagged = ds[2]
    assert tagged["has_labelmap"] is False and bool((tagged["labelmap"] == 255).all())
    assert tagged["tags"].tolist() == [1.0, 1.0, 0.0]
    no_maps = SegDataset(ds.manifest, use_labelmaps=False)[0]
    assert no_maps["has_labelmap"] is False and bool((no_maps["labelmap"] == 255).all())


def test_collate_pads_bottom_right(tmp_path):
    ds = SegDataset(make_set(tmp_path))
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 33, 30) and batch["labelmap"].shape == (2, 33, 30)
    assert batch["id"] == ["0", "1"] and batch["index"].tolist() == [0, 1]
    assert batch["size"] == [(20, 30), (33, 17)]
    assert batch["tags"].shape == (2, 3) and batch["has_labelmap"].tolist() == [True, True]
    assert bool((batch["labelmap"][0, 20:] == 255).all())
    assert bool((batch["image"][0, :, 20:] == 0).all())
    assert bool((batch["labelmap"][1, :, 17:] == 255).all())
    assert torch.equal(batch["image"][1, :, :33, :17], ds[1]["image"])


def test_train_transform_crops_pads_and_keeps_alignment(tmp_path):
    # A labelmap that equals a function of the image lets us check they move together.
    h, w = 24, 40
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, : w // 2] = 250
    lm = np.zeros((h, w), dtype=np.uint8)
    lm[:, : w // 2] = 1
    Image.fromarray(img).save(tmp_path / "a.png")
    write_palette_png(tmp_path / "a_lm.png", lm)
    m = Manifest(CLASSES, [Record("a", "a.png", "a_lm.png", ["cat"])], tmp_path)
    torch.manual_seed(0)
    ds = SegDataset(m, train_transform(64, scale=(0.5, 1.5)))
    for _ in range(10):
        item = ds[0]
        assert item["image"].shape == (3, 64, 64) and item["labelmap"].shape == (64, 64)
        lab = item["labelmap"]
        pad = lab == 255
        assert pad.any()  # the image is smaller than the crop: padded
        assert bool((item["image"][:, pad] == 0).all())  # image padding 0 = the mean
        bright = item["image"][0] > 1.0
        assert bool((lab[bright & ~pad] == 1).float().mean() > 0.9)
        assert bool((lab[~bright & ~pad] == 0).float().mean() > 0.9)
    crop = SegDataset(m, train_transform(16))[0]
    assert crop["image"].shape == (3, 16, 16) and crop["size"] == (h, w)


def test_dataloader_with_workers(tmp_path):
    ds = SegDataset(make_set(tmp_path, sizes=[(20 + i, 30 - i) for i in range(8)]),
                    train_transform(24))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate, shuffle=True)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 24, 24) and batch["labelmap"].dtype == torch.int64
        seen += batch["id"]
    assert sorted(seen, key=int) == [str(i) for i in range(8)]
    eval_loader = DataLoader(SegDataset(ds.manifest, eval_transform()), batch_size=4,
                             num_workers=2, collate_fn=collate)
    shapes = [b["image"].shape for b in eval_loader]
    assert shapes == [(4, 3, 23, 30), (4, 3, 27, 26)]


def test_bad_labelmap_size_raises_naming_file(tmp_path):
    m = make_set(tmp_path)
    write_palette_png(tmp_path / "0_lm.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(BadInputError, match="0_lm.png: labelmap is 5x5 but its image is 30x20"):
        SegDataset(m)[0]


def test_bad_item_in_a_worker_is_still_one_line(tmp_path):
    m = make_set(tmp_path)
    (tmp_path / "1.png").write_bytes(b"")
    loader = DataLoader(SegDataset(m), batch_size=1, num_workers=2, collate_fn=collate)
    with pytest.raises(BadInputError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and message == f"{tmp_path / '1.png'}: empty image file (0 bytes)"


def test_decoded_memo_gives_the_same_items_and_keeps_to_its_limit(tmp_path, monkeypatch):
    import discli.data.dataset as dataset

    m = make_set(tmp_path)
    plain, memo = (SegDataset(m, train_transform(24, scale=(0.5, 1.5))) for _ in range(2))
    memo.keep_decoded(1)  # 1 MB: every image of the set fits
    decoded = []
    monkeypatch.setattr(dataset, "read_image", lambda p: decoded.append(p) or read_image(p))
    for seed in range(3):
        for i in range(len(m.records)):
            torch.manual_seed(seed)
            a = plain[i]
            torch.manual_seed(seed)
            b = memo[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["labelmap"],
                                                                        b["labelmap"])
            b["tags"][:] = 7  # a caller's change to an item never reaches the memo
            assert torch.equal(memo[i]["tags"], plain[i]["tags"])
    # the plain set decodes every time; the memo once per image
    assert len(decoded) == 2 * 3 * 3 + 3  # plain: twice per image and seed
    small = SegDataset(m)
    small.keep_decoded(1)
    small.memo.limit = 2500  # room for the first image (20 x 30: 2412 bytes with its maps)
    for i in range(3):
        small[i]
    assert list(small.memo.held) == [0] and small.memo.used <= small.memo.limit
