"""Dataset IoU, confusion-matrix mIoU and CascadePSP's mBA against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.metrics import (
    IoUAccumulator,
    binary_dilation,
    boundary_accuracy,
    boundary_accuracy_multiclass,
    boundary_radii,
    confusion_matrix,
    dataset_iou,
    ellipse_kernel,
    mean_boundary_accuracy,
    miou,
)


def test_ellipse_kernels_are_opencvs():
    # cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2r+1, 2r+1)) for r = 1, 2, 3
    assert ellipse_kernel(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert ellipse_kernel(2).astype(int).tolist() == [
        [0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert ellipse_kernel(3).astype(int).tolist() == [
        [0, 0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]]


def test_radii_follow_the_reference_formula():
    assert boundary_radii(1500, 1500) == [1, 2, 4, 6, 8]  # R = 10: 1 + int(1.8 i)
    assert boundary_radii(300, 300) == [1, 1, 1, 1, 1]  # R = 2: 1 + int(0.2 i)
    assert boundary_radii(60, 40) == [1, 1, 1, 1, 1]  # R < 1: int() truncates toward zero
    assert boundary_radii(2160, 3840) == [1, 4, 8, 12, 16]  # R = 20: 1 + int(3.8 i)


def test_mba_of_a_square_by_hand():
    gt = np.zeros((10, 10), bool)
    gt[3:7, 3:7] = True  # 16 px; radius 1 everywhere (w + h = 20)
    # dilation with the 3x3 cross: 16 + 4 * 4 = 32 px; erosion: the inner 2 x 2 = 4 px
    # band = 28 px: 12 inside the square, 16 outside
    assert boundary_accuracy(gt, gt) == 1.0
    assert boundary_accuracy(np.zeros_like(gt), gt) == pytest.approx(16 / 28)
    assert boundary_accuracy(np.ones_like(gt), gt) == pytest.approx(12 / 28)
    shifted = np.zeros_like(gt)
    shifted[3:7, 4:8] = True  # wrong on column 3 (4 px, inside band) and column 7 (4 px)
    assert boundary_accuracy(shifted, gt) == pytest.approx((28 - 8) / 28)


def test_mba_never_erodes_from_the_image_border():
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True
    # OpenCV pads erosion with +inf: only columns 4 and 5 form the band (20 px)
    assert boundary_accuracy(np.ones_like(gt), gt) == pytest.approx(10 / 20)
    assert math.isnan(boundary_accuracy(gt, np.zeros_like(gt)))


def _brute_mba(pred: np.ndarray, gt: np.ndarray) -> float:
    """Direct definition: band pixel iff the kernel window around it holds both values."""
    h, w = gt.shape
    accs = []
    for r in boundary_radii(h, w):
        k = ellipse_kernel(r)
        offs = [(dy - r, dx - r) for dy, dx in zip(*np.nonzero(k))]
        dil = np.zeros_like(gt)
        ero = np.ones_like(gt)
        for dy, dx in offs:
            shifted = np.zeros_like(gt)
            inside = np.zeros_like(gt)
            ys, yd = slice(max(0, dy), h + min(0, dy)), slice(max(0, -dy), h + min(0, -dy))
            xs, xd = slice(max(0, dx), w + min(0, dx)), slice(max(0, -dx), w + min(0, -dx))
            shifted[yd, xd] = gt[ys, xs]
            inside[yd, xd] = True
            dil |= shifted
            ero &= shifted | ~inside  # outside the image counts as foreground for erosion
        band = dil & ~ero
        accs.append((pred[band] == gt[band]).mean())
    return float(np.mean(accs))


def test_mba_matches_the_definition_at_larger_radii():
    rng = np.random.default_rng(0)
    h, w = 330, 420  # R = 2.5 -> radii 1, 1, 1, 1, 2
    yy, xx = np.mgrid[0:h, 0:w]
    gt = (yy - 160) ** 2 + (xx - 200) ** 2 < 90 ** 2
    pred = gt ^ (rng.random(gt.shape) < 0.2)
    assert boundary_radii(h, w)[-1] == 2
    assert boundary_accuracy(pred, gt) == pytest.approx(_brute_mba(pred, gt), abs=1e-12)
    big = np.zeros((900, 900), bool)
    big[200:700, 150:600] = True  # R = 6 -> radii 1, 2, 3, 4, 5
    noisy = big ^ (rng.random(big.shape) < 0.1)
    assert boundary_accuracy(noisy, big) == pytest.approx(_brute_mba(noisy, big), abs=1e-12)


def test_mean_mba_averages_images_and_skips_boundaryless_ones():
    gt = np.zeros((10, 10), bool)
    gt[3:7, 3:7] = True
    empty = np.zeros((10, 10), bool)
    pairs = [(gt, gt), (np.zeros_like(gt), gt), (empty, empty)]
    assert mean_boundary_accuracy(pairs) == pytest.approx((1 + 16 / 28) / 2)


def test_multiclass_mba_leaves_void_out():
    gt = np.zeros((10, 10), np.uint8)
    gt[:, :5] = 1
    gt[:, 5:] = 2
    gt[0, :] = 0  # void row
    pred = gt.copy()
    pred[:, 4] = 2  # class 1's edge column wrong (9 non-void pixels)
    # band: union of the gradients of class 1 (cols 4-5, rows 0..9 incl. row-0 neighbours) and
    # class 2 (cols 4-5); row 0 is void; per-class gradients also mark row 0/1 around the void
    acc = boundary_accuracy_multiclass(pred, gt, void=0)
    band_non_void = 2 * 9 + 10 - 2  # cols 4, 5 in rows 1-9, plus row 1 cols 0-9 except 4, 5
    assert acc == pytest.approx((band_non_void - 9) / band_non_void)


def test_dataset_iou_is_total_intersection_over_total_union():
    a_pred = np.array([[1, 1, 0, 0]], bool)
    a_gt = np.array([[1, 1, 1, 1]], bool)  # I=2, U=4
    b_pred = np.array([[0.9, 0.6, 0.2, 0.0, 0.0, 0.0]])  # > 0.5: first two
    b_gt = np.array([[0, 0, 255, 255, 255, 255]], np.uint8)  # I=0, U=6
    assert dataset_iou([(a_pred, a_gt), (b_pred, b_gt)]) == pytest.approx(2 / 10)
    acc = IoUAccumulator()
    assert acc.value == 1.0
    with pytest.raises(ValueError):
        acc.update(a_pred, b_gt)


def test_confusion_matrix_and_miou_with_ignore_index():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, gt, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m, per_class = miou(cm)
    # class 0: TP 1, union 2 + 2 - 1 = 3; class 1: TP 2, union 2 + 3 - 2 = 3; class 2: 1 / 2
    np.testing.assert_allclose(per_class, [1 / 3, 2 / 3, 1 / 2])
    assert m == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    m4, per4 = miou(confusion_matrix(pred, gt, 4, ignore_index=255))
    assert math.isnan(per4[3]) and m4 == pytest.approx(m)  # an empty class is left out
    with pytest.raises(ValueError):
        confusion_matrix(pred + 5, gt, 3)


@pytest.mark.parametrize("shape,radius", [((40, 50), 3), ((9, 30), 7), ((30, 5), 6), ((1, 1), 2)])
def test_binary_dilation_matches_the_kernel_definition(shape, radius):
    rng = np.random.default_rng(radius)
    m = rng.random(shape) < 0.1
    k = ellipse_kernel(radius)
    h, w = shape
    expect = np.zeros(shape, bool)
    for y, x in zip(*np.nonzero(m)):  # stamp the kernel at every set pixel, clipped to the image
        for dy, dx in zip(*np.nonzero(k)):
            yy, xx = y + dy - radius, x + dx - radius
            if 0 <= yy < h and 0 <= xx < w:
                expect[yy, xx] = True
    np.testing.assert_array_equal(binary_dilation(m, radius), expect)


def test_open_confusion_matrix_counts_unknown_predictions_as_misses():
    from engine.metrics import confusion_matrix_open

    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 7, 1, 1]])  # 7: a class the data does not have
    cm = confusion_matrix_open(pred, gt, 2, None)
    assert cm.shape == (3, 3) and cm[0, 2] == 1 and cm[0, 0] == 1 and cm[1, 1] == 2
    per_class = miou(cm)[1]
    assert per_class[0] == pytest.approx(0.5) and per_class[1] == pytest.approx(1.0)
