"""Segmentation and tag metrics: accumulators that can be summed across processes.

Segmentation (VOC protocol)
    One confusion matrix ``C`` (rows: ground truth, columns: prediction) is accumulated over the
    whole set; pixels whose ground truth is 255 (or any value outside ``0..K-1``) are ignored.
    ``IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk)``. **mIoU rule**: the mean of IoU_k over
    the classes with ``gt + pred`` pixel count > 0 (the union is not empty); a class absent from
    both the ground truth and the predictions of the whole set is left out (its IoU is ``None``).
    Pixel accuracy is ``trace(C) / sum(C)``.

Boundary F-score (within a pixel tolerance)
    Per image, the boundaries of the ground truth and of the prediction are the pixels
    ``skimage.segmentation.find_boundaries(mode="thick")`` marks (a pixel whose 4-neighbourhood
    holds another label). Before that, ignored (255) ground-truth pixels take the label of the
    nearest valid pixel, so a thin "void" band between two regions (as VOC draws around objects)
    carries the boundary in its middle. A predicted boundary pixel is *matched* if a ground-truth
    boundary pixel lies within ``tolerance`` pixels (Euclidean distance transform), and vice versa.
    Boundary pixels (of either map) deep inside an ignore region — farther than ``void_margin``
    pixels from every valid pixel — are not counted: the ground truth says nothing there. The four
    counts (matched/total, predicted and ground truth) are summed over the set;
    ``precision = matched_pred / pred``, ``recall = matched_gt / gt``, ``F = 2PR / (P + R)``
    (an empty side counts as 1.0 when the other side is empty as well, else 0.0).

Tags (multi-label)
    Per class, precision / recall / F1 of a predicted tag set against the true one, plus the
    micro average over every (image, class) pair; background (class 0) is excluded.

Every accumulator keeps its state in one int64/float64 tensor (:meth:`state`), so a distributed
run sums it with one ``all_reduce`` (:meth:`all_reduce`) before :meth:`compute`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

from discli.distributed import all_reduce_sum
from discli.data.labelmap import IGNORE as IGNORE_INDEX  # void: not counted


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# ----------------------------------------------------------------------------- confusion matrix


class ConfusionMatrix:
    """``bincount(K * gt + pred)`` over the set; ground truth outside ``0..K-1`` is ignored."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Any, target: Any) -> None:
        pred, target = _as_tensor(pred).to(self.mat.device), _as_tensor(target).to(self.mat.device)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth "
                             f"{tuple(target.shape)} differ in shape")
        k = self.num_classes
        target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
        keep = (target >= 0) & (target < k)
        idx = k * target[keep] + pred[keep].clamp(0, k - 1)
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def state(self) -> torch.Tensor:
        return self.mat

    def all_reduce(self) -> ConfusionMatrix:
        all_reduce_sum(self.mat)
        return self

    def compute(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        return segmentation_scores(self.mat.cpu().numpy(), classes)


def iou_per_class(mat: np.ndarray) -> np.ndarray:
    """IoU of every class; NaN where the class has no ground-truth and no predicted pixel."""
    mat = np.asarray(mat, dtype=np.float64)
    tp = np.diag(mat)
    union = mat.sum(axis=1) + mat.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(mat: np.ndarray) -> float:
    """Mean IoU over the classes with gt + pred pixel count > 0 (NaN if there is none)."""
    iou = iou_per_class(mat)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(mat: np.ndarray) -> float:
    mat = np.asarray(mat, dtype=np.float64)
    total = mat.sum()
    return float(np.trace(mat) / total) if total > 0 else float("nan")


def segmentation_scores(mat: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU (``None`` for absent classes), mIoU, pixel accuracy, pixel counts."""
    mat = np.asarray(mat)
    names = list(classes) if classes is not None else [str(i) for i in range(len(mat))]
    iou = iou_per_class(mat)
    return {
        "miou": mean_iou(mat),
        "pixel_acc": pixel_accuracy(mat),
        "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        "classes_counted": int((~np.isnan(iou)).sum()),
        "pixels": int(mat.sum()),
    }


# ----------------------------------------------------------------------------- boundary F


def _fill_ignored(gt: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Give each ignored pixel the label of its nearest valid pixel."""
    if not ignore.any() or ignore.all():
        return gt
    _, nearest = ndimage.distance_transform_edt(ignore, return_indices=True)
    return gt[tuple(nearest)]


def boundary_counts(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0,
                    ignore_index: int = IGNORE_INDEX, void_margin: float = 5.0) -> np.ndarray:
    """``[matched_pred, total_pred, matched_gt, total_gt]`` boundary pixels of one image."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    ignore = gt == ignore_index
    if ignore.all():
        return np.zeros(4, dtype=np.int64)
    gt_filled = _fill_ignored(gt, ignore)
    b_pred = find_boundaries(pred, mode="thick")
    b_gt = find_boundaries(gt_filled, mode="thick")
    if ignore.any():
        counted = ndimage.distance_transform_edt(ignore) <= void_margin
        b_pred &= counted
        b_gt &= counted
    # distance of every pixel to the nearest boundary pixel of the other map
    dist_to_gt = (ndimage.distance_transform_edt(~b_gt) if b_gt.any()
                  else np.full(gt.shape, np.inf))
    dist_to_pred = (ndimage.distance_transform_edt(~b_pred) if b_pred.any()
                    else np.full(gt.shape, np.inf))
    return np.array([(dist_to_gt[b_pred] <= tolerance).sum(), b_pred.sum(),
                     (dist_to_pred[b_gt] <= tolerance).sum(), b_gt.sum()], dtype=np.int64)


def boundary_scores(counts: Sequence[float]) -> dict[str, float]:
    matched_pred, total_pred, matched_gt, total_gt = (float(c) for c in counts)
    if total_pred > 0:
        precision = matched_pred / total_pred
    else:
        precision = 1.0 if total_gt == 0 else 0.0
    if total_gt > 0:
        recall = matched_gt / total_gt
    else:
        recall = 1.0 if total_pred == 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class BoundaryF:
    """Boundary precision/recall/F accumulated over a set (see the module docstring)."""

    def __init__(self, tolerance: float = 2.0, void_margin: float = 5.0,
                 device: str | torch.device = "cpu"):
        self.tolerance, self.void_margin = tolerance, void_margin
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)

    def update(self, pred: Any, target: Any) -> None:
        pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        target = target.cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
        counts = boundary_counts(pred, target, self.tolerance, void_margin=self.void_margin)
        self.counts += torch.from_numpy(counts).to(self.counts.device)

    def state(self) -> torch.Tensor:
        return self.counts

    def all_reduce(self) -> BoundaryF:
        all_reduce_sum(self.counts)
        return self

    def compute(self) -> dict[str, float]:
        return {**boundary_scores(self.counts.tolist()), "tolerance": self.tolerance}


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0) -> float:
    """Boundary F-score of one image."""
    return boundary_scores(boundary_counts(pred, gt, tolerance))["f1"]


# ----------------------------------------------------------------------------- tags


def _prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tag_scores(pred: Any, truth: Any, classes: Sequence[str],
               exclude_background: bool = True) -> dict[str, Any]:
    """Precision, recall and F1 of multi-hot tags ``pred`` vs ``truth`` (both (N, K)).

    Returns ``{"per_class": {name: {precision, recall, f1, tp, fp, fn, support}},
    "micro": {precision, recall, f1, tp, fp, fn}, "macro_f1": ..., "images": N}``; the micro
    average pools every (image, class) decision, background (index 0) excluded by default.
    """
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape or pred.ndim != 2 or pred.shape[1] != len(classes):
        raise ValueError(f"tag arrays {pred.shape} / {truth.shape} do not fit "
                         f"{len(classes)} classes")
    first = 1 if exclude_background else 0
    tp = (pred & truth).sum(axis=0)
    fp = (pred & ~truth).sum(axis=0)
    fn = (~pred & truth).sum(axis=0)
    per_class = {}
    for k in range(first, len(classes)):
        per_class[classes[k]] = {**_prf(tp[k], fp[k], fn[k]), "tp": int(tp[k]), "fp": int(fp[k]),
                                 "fn": int(fn[k]), "support": int(tp[k] + fn[k])}
    totals = [int(x[first:].sum()) for x in (tp, fp, fn)]
    micro = {**_prf(*totals), "tp": totals[0], "fp": totals[1], "fn": totals[2]}
    f1s = [v["f1"] for v in per_class.values() if v["support"] + v["fp"] > 0]
    return {"per_class": per_class, "micro": micro,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0, "images": int(pred.shape[0])}
