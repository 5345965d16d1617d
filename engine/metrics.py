"""Segmentation metrics: dataset IoU, confusion-matrix mIoU, and CascadePSP's boundary accuracy.

- ``IoUAccumulator`` / ``dataset_iou``: total intersection over total union across a dataset,
  masks thresholded at 0.5 (uint8 0/255 at 127, as the reference's > 128 on 8-bit files would
  differ only for the value 128).
- ``confusion_matrix`` / ``miou``: rows are ground truth, columns prediction; pixels whose ground
  truth is ``ignore_index`` are left out; classes with an empty union are left out of the mean.
- ``boundary_accuracy`` (mBA of one image) and ``mean_boundary_accuracy``: exactly the
  reference's definition: for i in 0..4, r_i = 1 + int((R - 1) / 5 * i) with R = (w + h) / 300;
  the band is the morphological gradient (dilation != erosion) of the ground truth with OpenCV's
  elliptical (2r+1) x (2r+1) structuring element; accuracy is the share of band pixels where the
  prediction equals the ground truth; mean over the five radii, then over images.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def binarise(mask: np.ndarray) -> np.ndarray:
    """bool: as is; uint8: > 127; other integers: > 0; float: > 0.5."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:
        return mask > 127
    if mask.dtype.kind in "iu":
        return mask > 0
    return mask > 0.5


class IoUAccumulator:
    """Sums intersection and union over (prediction, ground truth) pairs."""

    def __init__(self) -> None:
        self.intersection = 0
        self.union = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p, g = binarise(pred), binarise(gt)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
        self.intersection += int(np.count_nonzero(p & g))
        self.union += int(np.count_nonzero(p | g))

    @property
    def value(self) -> float:
        """Total intersection / total union; 1.0 when both are empty everywhere."""
        return self.intersection / self.union if self.union else 1.0


def dataset_iou(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """IoU over a dataset of (prediction, ground truth) pairs: sum(I) / sum(U)."""
    acc = IoUAccumulator()
    for pred, gt in pairs:
        acc.update(pred, gt)
    return acc.value


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """int64 (C, C) counts, ``[gt, pred]``; ground-truth ``ignore_index`` pixels are skipped.

    Raises ``ValueError`` when a counted pixel's class (either side) is outside [0, C).
    """
    pred, gt = np.asarray(pred).reshape(-1), np.asarray(gt).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction size {pred.size} != ground truth size {gt.size}")
    if ignore_index is not None:
        keep = gt != ignore_index
        g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    else:
        g, p = gt.astype(np.int64), pred.astype(np.int64)
    for name, v in (("ground truth", g), ("prediction", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} holds class values outside 0..{num_classes - 1}")
    cm = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


def confusion_matrix_open(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                          ignore_index: int | None = 255) -> np.ndarray:
    """Like :func:`confusion_matrix`, for predictions that may hold ids outside [0, C).

    Such predictions (a model with more classes than the data) are counted in an extra last
    column, so they are misses of their pixel's true class. Returns int64 (C + 1, C + 1).
    """
    pred = np.asarray(pred)
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    return confusion_matrix(pred, gt, num_classes + 1, ignore_index)


def miou(cm: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean IoU over classes with a non-empty union, per-class IoU with NaN for empty ones)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    valid = ~np.isnan(iou)
    return (float(iou[valid].mean()) if valid.any() else float("nan")), iou


def ellipse_kernel(radius: int) -> np.ndarray:
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (2r+1, 2r+1))`` as a bool array.

    Row ``dy`` (from the centre) spans ``dx = round(r * sqrt((r^2 - dy^2) / r^2))`` columns
    each side; this is not the same set as x^2 + y^2 <= r^2 (e.g. r = 2 gives full rows at
    dy = +-1).
    """
    r = int(radius)
    k = np.zeros((2 * r + 1, 2 * r + 1), bool)
    if r == 0:
        k[0, 0] = True
        return k
    for i in range(2 * r + 1):
        dy = i - r
        dx = int(np.rint(r * math.sqrt((r * r - dy * dy) / (r * r))))
        k[i, max(r - dx, 0):min(r + dx + 1, 2 * r + 1)] = True
    return k


def boundary_radii(height: int, width: int) -> list[int]:
    """The five radii of mBA for an image of this size."""
    max_radius = (width + height) / 300
    return [1 + int((max_radius - 1) / 5 * i) for i in range(5)]


def _row_window_or(padded: np.ndarray, half: int, pad: int, spans: dict[int, np.ndarray]) -> np.ndarray:
    """any(row[x - half : x + half + 1]) for the columns of ``padded`` between its ``pad``-wide
    zero margins (``half <= pad``), so every window lies inside the padded row.

    ``spans[k]`` caches any(padded[:, x : x + k]) for powers of two k (built by doubling); a
    window of length n is the OR of two overlapping spans of length 2**floor(log2 n).
    """
    wp = padded.shape[1]
    n = 2 * half + 1
    k = 1
    while k * 2 <= n:
        if k * 2 not in spans:
            prev = spans[k]
            nxt = prev.copy()
            nxt[:, : wp - k] |= prev[:, k:]
            spans[k * 2] = nxt
        k *= 2
    w = wp - 2 * pad
    left = spans[k][:, pad - half: pad - half + w]
    right = spans[k][:, pad + half - k + 1: pad + half - k + 1 + w]
    return left | right


def binary_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by ``ellipse_kernel(radius)``, pixels outside the image counting as 0.

    The kernel is a stack of centred horizontal runs (one per row offset), so the dilation is the
    OR of row-shifted 1-D window maxima: O(pixels x (2r + log r)) instead of O(pixels x r^2).
    """
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    k = ellipse_kernel(radius)
    r = k.shape[0] // 2
    padded = np.zeros((h, w + 2 * r), bool)
    padded[:, r:r + w] = m
    spans: dict[int, np.ndarray] = {1: padded}
    runs: dict[int, np.ndarray] = {}
    out = np.zeros((h, w), bool)
    for i in range(k.shape[0]):
        half = int(k[i].sum()) // 2
        if half not in runs:
            runs[half] = _row_window_or(padded, half, r, spans)
        row = runs[half]
        dy = i - r  # out[y] gathers row y + dy
        if abs(dy) >= h:
            continue
        if dy >= 0:
            out[: h - dy] |= row[dy:]
        else:
            out[-dy:] |= row[: h + dy]
    return out


def _gradient_band(gt: np.ndarray, radius: int) -> np.ndarray:
    # OpenCV pads dilation with -inf and erosion with +inf: the image border never counts.
    # Erosion with a symmetric kernel is the complement of the dilation of the complement.
    return binary_dilation(gt, radius) & binary_dilation(~gt, radius)


def boundary_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """mBA of one binary prediction against its binary ground truth (see module docstring).

    Inputs are binarised like ``binarise``. Returns NaN when the ground truth has no boundary
    (the reference would divide by zero).
    """
    p, g = binarise(pred), binarise(gt)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} must be equal 2-D shapes")
    h, w = g.shape
    accs = []
    for r in boundary_radii(h, w):
        band = _gradient_band(g, r)
        n = int(band.sum())
        if n == 0:
            return float("nan")
        accs.append(np.count_nonzero(p[band] == g[band]) / n)
    return sum(accs) / len(accs)


def boundary_accuracy_multiclass(pred: np.ndarray, gt: np.ndarray, void: int | None = 0) -> float:
    """Multi-class mBA as the reference computes it for scene parsing.

    The band is the union of per-class gradients of every ground-truth class except ``void``;
    ``void`` pixels inside the band are left out of both counts.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    h, w = gt.shape
    classes = [c for c in np.unique(gt) if void is None or c != void]
    accs = []
    for r in boundary_radii(h, w):
        band = np.zeros(gt.shape, bool)
        for c in classes:
            band |= _gradient_band(gt == c, r)
        g, p = gt[band], pred[band]
        n = g.size - (int(np.count_nonzero(g == void)) if void is not None else 0)
        if n <= 0:
            return float("nan")
        correct = np.count_nonzero((p == g) & ((g != void) if void is not None else True))
        accs.append(correct / n)
    return sum(accs) / len(accs)


def mean_boundary_accuracy(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean of ``boundary_accuracy`` over images that have a boundary (others are skipped)."""
    values = [boundary_accuracy(p, g) for p, g in pairs]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
