"""training.evaluate: mIoU at the ground truth's resolution, PSNR/SSIM."""
from __future__ import annotations

import numpy as np
import pytest

from engine.segment import SegResult
from training.evaluate import evaluate_segmenter, psnr, ssim


class Data:
    classes = ["a", "b", "c"]
    ignore_index = 255

    def __init__(self):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(3):
            labels = rng.integers(0, 3, size=(12, 16)).astype(np.uint8)
            labels[0] = 255
            self.items.append((rng.random((12, 16, 3), dtype=np.float32), labels))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Oracle:
    """Predicts the ground truth, except class 'c' everywhere on the void row and as 'b' in image 0."""

    def __init__(self, data):
        self.data, self.calls = data, 0

    def predict(self, image, working_size=None):
        labels = next(lab for im, lab in self.data.items if im is image).copy()
        if self.calls == 0:
            labels[labels == 2] = 1
        labels[0] = 2
        self.calls += 1
        return SegResult(labels=labels, probs=np.zeros((3, *labels.shape), np.float16), working_size=(6, 8))


def test_miou_ignores_void_and_counts_confusions():
    data = Data()
    scores = evaluate_segmenter(Oracle(data), data)
    gt = np.concatenate([lab[1:].ravel() for _, lab in data.items])
    first = data.items[0][1][1:]
    c_in_first = int((first == 2).sum())
    c_total, b_total = int((gt == 2).sum()), int((gt == 1).sum())
    assert scores.per_class["a"] == pytest.approx(1.0)
    assert scores.per_class["b"] == pytest.approx(b_total / (b_total + c_in_first))
    assert scores.per_class["c"] == pytest.approx((c_total - c_in_first) / c_total)
    assert scores.miou == pytest.approx(np.mean(list(scores.per_class.values())))
    assert scores.pixel_accuracy == pytest.approx(1 - c_in_first / gt.size)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    assert psnr(a, a) == float("inf")
    assert psnr(a, np.clip(a + 0.1, 0, 1)) > psnr(a, np.clip(a + 0.2, 0, 1))
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 0.1)) == pytest.approx(20.0)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, rng.random((32, 32, 3))) < 0.2
