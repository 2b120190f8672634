import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from discli.evaluation.metrics import (BoundaryF, ConfusionMatrix, boundary_counts, boundary_f,
                                       iou_per_class, mean_iou, pixel_accuracy,
                                       segmentation_scores, tag_scores)


def reference_miou(pred: np.ndarray, gt: np.ndarray, k: int) -> tuple[float, list]:
    """Independent per-class set computation (no confusion matrix)."""
    valid = gt != 255
    ious = []
    for c in range(k):
        p, g = (pred == c) & valid, (gt == c) & valid
        union = (p | g).sum()
        ious.append(None if union == 0 else (p & g).sum() / union)
    present = [v for v in ious if v is not None]
    return float(np.mean(present)), ious


def test_hand_built_confusion_matrix():
    # rows = ground truth, columns = prediction; class 3 never appears anywhere
    mat = np.array([[50, 2, 3, 0],
                    [4, 30, 0, 0],
                    [1, 0, 10, 0],
                    [0, 0, 0, 0]])
    iou = iou_per_class(mat)
    assert iou[0] == pytest.approx(50 / (55 + 55 - 50))
    assert iou[1] == pytest.approx(30 / (34 + 32 - 30))
    assert iou[2] == pytest.approx(10 / (11 + 13 - 10))
    assert np.isnan(iou[3])
    assert mean_iou(mat) == pytest.approx(np.mean(iou[:3]))
    assert pixel_accuracy(mat) == pytest.approx(90 / 100)
    scores = segmentation_scores(mat, ["bg", "a", "b", "c"])
    assert scores["iou"]["c"] is None and scores["classes_counted"] == 3


def test_predicted_only_class_counts_in_miou():
    # class 2 has no ground truth but is predicted: IoU 0 and it is part of the mean
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    scores = cm.compute()
    assert scores["iou"]["2"] == 0.0
    assert scores["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_confusion_matrix_ignores_255_and_matches_reference():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(5)
    preds, gts = [], []
    for shape in [(17, 23), (8, 8), (31, 5)]:
        gt = rng.integers(0, 5, shape)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, 5, shape)
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
        preds.append(pred.ravel())
        gts.append(gt.ravel())
    ref_miou, ref_iou = reference_miou(np.concatenate(preds), np.concatenate(gts), 5)
    scores = cm.compute()
    assert scores["miou"] == pytest.approx(ref_miou)
    assert [scores["iou"][str(c)] for c in range(5)] == pytest.approx(ref_iou)
    assert cm.mat.sum() == sum((g != 255).sum() for g in gts)


def test_ignored_pixels_do_not_change_scores():
    gt = np.array([[0, 1, 255, 255]])
    a = ConfusionMatrix(2)
    a.update(np.array([[0, 1, 0, 0]]), gt)
    b = ConfusionMatrix(2)
    b.update(np.array([[0, 1, 1, 1]]), gt)
    assert torch.equal(a.mat, b.mat) and a.compute()["miou"] == 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_miou_property_vs_reference(k, h, w, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, (h, w))
    gt[rng.random((h, w)) < 0.3] = 255
    pred = rng.integers(0, k, (h, w))
    cm = ConfusionMatrix(k)
    cm.update(pred, gt)
    if (gt != 255).any():
        assert cm.compute()["miou"] == pytest.approx(reference_miou(pred, gt, k)[0])


def _square(size=40, lo=10, hi=30):
    gt = np.zeros((size, size), np.uint8)
    gt[lo:hi, lo:hi] = 1
    return gt


def test_boundary_f_perfect_and_shifted():
    gt = _square()
    assert boundary_f(gt, gt, tolerance=2) == 1.0
    shifted = np.roll(gt, 5, axis=1)
    f_shift = boundary_f(shifted, gt, tolerance=2)
    assert f_shift < 0.8
    assert boundary_f(np.roll(gt, 1, axis=1), gt, tolerance=2) == 1.0  # within tolerance
    assert boundary_f(np.zeros_like(gt), gt) == 0.0


def test_boundary_f_ignores_deep_void_regions():
    gt = np.zeros((40, 64), np.uint8)
    gt[10:30, 10:30] = 1
    gt[:, 34:] = 255  # wide unlabelled strip (deeper than the void margin in its middle)
    noisy = np.where(gt == 255, 0, gt).astype(np.uint8)
    noisy[2:38, 47:50] = 2  # a predicted region deep inside the ignored strip
    assert boundary_f(noisy, gt) == 1.0
    noisy[2:38, 22:24] = 2  # ... but not on valid pixels
    assert boundary_f(noisy, gt) < 1.0


def test_boundary_thin_void_band_carries_the_boundary():
    gt = _square()
    band = gt.copy()
    band[8:32, 8:32][(np.pad(np.ones((16, 16)), 4) == 0)] = 255  # 4-px void ring around object
    band[12:28, 12:28] = 1
    assert boundary_f(gt, band, tolerance=2) == 1.0


def test_boundary_accumulator_sums_counts():
    gt = _square()
    acc = BoundaryF(tolerance=2)
    acc.update(torch.from_numpy(gt), torch.from_numpy(gt))
    acc.update(np.roll(gt, 5, axis=1), gt)
    c1 = boundary_counts(gt, gt, 2)
    c2 = boundary_counts(np.roll(gt, 5, axis=1), gt, 2)
    assert acc.counts.tolist() == (c1 + c2).tolist()
    assert 0 < acc.compute()["f1"] < 1


def test_tag_scores_per_class_and_micro():
    classes = ["background", "cat", "dog"]
    truth = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1]])
    pred = np.array([[1, 1, 1], [1, 0, 1], [1, 0, 1]])
    s = tag_scores(pred, truth, classes)
    assert "background" not in s["per_class"]
    cat, dog = s["per_class"]["cat"], s["per_class"]["dog"]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (1, 0, 1)
    assert cat["precision"] == 1.0 and cat["recall"] == 0.5
    assert (dog["tp"], dog["fp"], dog["fn"]) == (2, 1, 0)
    assert s["micro"]["precision"] == pytest.approx(3 / 4)
    assert s["micro"]["recall"] == pytest.approx(3 / 4)
    assert s["micro"]["f1"] == pytest.approx(3 / 4)
