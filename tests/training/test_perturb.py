"""Coarse-mask perturbation: IoU lands in the target range, contours refill exactly, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, polygon

from training.perturb import (
    PerturbConfig,
    ellipse_footprint,
    lowres_mask,
    mask_iou,
    perturb_mask,
    resample_contours,
)

SIZE = 96


def _disk(r=30, centre=(48, 48)):
    m = np.zeros((SIZE, SIZE), bool)
    m[disk(centre, r, shape=m.shape)] = True
    return m


def _shapes() -> dict[str, np.ndarray]:
    ring = _disk(34)
    ring[disk((48, 48), 12)] = False  # a hole
    half = np.zeros((SIZE, SIZE), bool)
    half[:, :41] = True  # touches three image borders
    star = np.zeros((SIZE, SIZE), bool)
    angles = np.linspace(0, 2 * np.pi, 11)[:-1]
    radii = np.where(np.arange(10) % 2, 14, 40)
    star[polygon(48 + radii * np.sin(angles), 48 + radii * np.cos(angles), star.shape)] = True
    lines = np.zeros((SIZE, SIZE), bool)
    lines[::12] = True  # thin structures: resampling alone destroys them
    blocks = np.kron(np.random.default_rng(7).random((12, 12)) > 0.5, np.ones((8, 8), bool))
    tiny = _disk(3, (20, 70))
    return {
        "disk": _disk(),
        "ring": ring,
        "half": half,
        "star": star,
        "lines": lines,
        "blocks": blocks,
        "tiny": tiny,
    }


@pytest.mark.parametrize("name", list(_shapes()))
def test_iou_lands_in_target_range(name):
    gt = _shapes()[name]
    ious = []
    for seed in range(12):
        coarse = perturb_mask(gt, np.random.default_rng(seed))
        assert coarse.shape == gt.shape and coarse.dtype == bool
        ious.append(mask_iou(coarse, gt))
    assert min(ious) >= 0.8 and max(ious) <= 1.0
    assert max(ious) < 1.0, "the mask was never changed"
    assert np.ptp(ious) > 0.02, "targets drawn from [0.8, 1] should spread the IoUs"


def test_result_just_below_a_given_target():
    gt = _disk()
    for seed in range(10):
        iou = mask_iou(perturb_mask(gt, np.random.default_rng(seed), target_iou=0.9), gt)
        assert 0.8 <= iou < 0.9


def test_custom_range_is_respected():
    cfg = PerturbConfig(iou_range=(0.5, 0.6))
    gt = _shapes()["ring"]
    for seed in range(8):
        assert 0.5 <= mask_iou(perturb_mask(gt, np.random.default_rng(seed), cfg), gt) <= 0.6


def test_deterministic_given_rng():
    gt = _shapes()["star"]
    a = perturb_mask(gt, np.random.default_rng(3))
    b = perturb_mask(gt, np.random.default_rng(3))
    c = perturb_mask(gt, np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_contours_refill_exactly_without_cut_or_subsampling():
    gt = _shapes()["ring"] | _shapes()["half"]
    cfg = PerturbConfig(cut_fraction=0.0, keep_fraction=1.0)
    out = resample_contours(gt, np.random.default_rng(0), cfg)
    assert np.array_equal(out, gt)  # holes stay holes, border-touching regions stay filled


def test_cut_and_resample_changes_boundary_but_keeps_large_shapes_close():
    gt = _disk(40)
    out = resample_contours(gt, np.random.default_rng(0))
    assert not np.array_equal(out, gt)
    assert mask_iou(out, gt) > 0.9  # the cut bridges a short gap; 10 % of points outline a disk well


def test_short_contours_are_dropped():
    assert resample_contours(_disk(1, (10, 10)), np.random.default_rng(0)) is None


def test_empty_mask_stays_empty():
    gt = np.zeros((40, 50), bool)
    assert not perturb_mask(gt, np.random.default_rng(0)).any()
    assert mask_iou(gt, gt) == 1.0


@pytest.mark.parametrize("rows,cols", [(9, 9), (4, 9), (9, 4), (3, 1)])
def test_ellipse_footprint(rows, cols):
    fp = ellipse_footprint(rows, cols)
    assert fp.shape == (rows, cols)
    assert np.array_equal(fp, fp[::-1]) and np.array_equal(fp, fp[:, ::-1])  # symmetric
    assert fp.any(axis=0).all() and fp.any(axis=1).all()  # spans its box
    if rows == cols == 9:
        assert not fp[0, 0] and fp[4].all()


def test_lowres_mask_loses_small_structures_and_detail_but_keeps_large_shapes():
    big = _disk(30)
    specks = np.zeros_like(big)
    specks[5:8, 5:8] = specks[88:91, 10:13] = True  # 3-px lesions, far from the disk
    gt = big | specks
    coarse = lowres_mask(gt, 8)
    assert coarse.shape == gt.shape and coarse.dtype == bool
    assert not (coarse & specks).any()  # 3 px at 1/8 scale average out below 0.5
    assert 0.8 < mask_iou(coarse, big) < 1.0  # the disk survives (12x12 px at 1/8), rougher
    assert mask_iou(lowres_mask(gt, 2), gt) > mask_iou(coarse, gt)  # milder shrinking, closer
    assert np.array_equal(lowres_mask(gt, 1), gt)
    with pytest.raises(ValueError, match="factor"):
        lowres_mask(gt, 0.5)
