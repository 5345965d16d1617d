"""Evaluation: segmentation mIoU at full label resolution, and the SR branch's PSNR/SSIM.

Segmentation follows the DSRL protocol: the network sees the image downscaled to its working
size (CamVid: 240x180) and predicts at 2x (480x360); the ground truth is never downscaled, and
a prediction at another size is resized to the ground truth's (nearest class after bilinear
probability upsampling, as :class:`engine.Segmenter` does).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.metrics import confusion_matrix_open, miou
from engine.segment import Segmenter

ProgressFn = Callable[[int, int, str], None]


@dataclass
class SegmentationScores:
    miou: float
    per_class: dict[str, float]
    pixel_accuracy: float
    images: int

    def as_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "per_class_iou": self.per_class, "pixel_accuracy": self.pixel_accuracy,
                "images": self.images}


def evaluate_segmenter(
    segmenter: Segmenter,
    dataset,
    *,
    working_size: int | None = None,
    on_progress: ProgressFn | None = None,
) -> SegmentationScores:
    """mIoU of ``segmenter`` over ``dataset`` (items ``(image, labels)`` with ``ignore_index``)."""
    classes = list(dataset.classes)
    n = len(classes)
    cm = np.zeros((n + 1, n + 1), np.int64)  # last column: predicted ids the data does not have
    for i in range(len(dataset)):
        image, labels = dataset[i]
        pred = segmenter.predict(image, working_size).labels
        cm += confusion_matrix_open(pred, labels, n, dataset.ignore_index)
        if on_progress is not None:
            on_progress(i + 1, len(dataset), "evaluated")
    per_class = miou(cm)[1][:n]
    valid = ~np.isnan(per_class)
    mean = float(per_class[valid].mean()) if valid.any() else float("nan")
    return SegmentationScores(
        miou=mean,
        per_class={c: float(v) for c, v in zip(classes, per_class)},
        pixel_accuracy=float(np.trace(cm) / max(cm.sum(), 1)),
        images=len(dataset),
    )


def segmenter_from_training_model(model: torch.nn.Module, card) -> Segmenter:
    """An inference :class:`Segmenter` built from a training model's weights (SISR dropped)."""
    from engine.models import create_model
    from engine.segment import load_inference_state

    inference = create_model(model.config, inference=True)
    load_inference_state(inference, model.state_dict(), "training model")
    return Segmenter(inference, card, device="cpu")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, data_range]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004; Gaussian window, sigma 1.5) of two images in [0, 1]."""
    from skimage.metrics import structural_similarity

    channel_axis = -1 if np.asarray(a).ndim == 3 else None
    return float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=channel_axis))
