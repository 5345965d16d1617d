"""DSRL training pairs: LR input, HR image and full-size labels from a segmentation dataset.

``DSRLPairs(base, config, train=True)[i] -> (lr (3, H/2, W/2), hr (3, H, W), label (H, W))``:
float32 images in [0, 1] and int64 labels (ignore index kept). LR is HR halved with torch
bilinear anti-aliased resizing (``training.augment.downscale_by_2``, the same filter inference
uses to reach the working size), so LR is exactly half of HR.

Training: random scale, a crop of ``crop_size`` HR pixels (padded with zeros / the ignore index
where the scaled image is smaller), horizontal flip, colour jitter on HR before LR is derived.
Validation: no augmentation, the full image, padded (bottom/right) to a multiple of
``2 * pad_multiple`` only if needed (CamVid val: HR 480x360, LR 240x180).

Sample ``i`` of epoch ``e`` uses ``np.random.default_rng([seed, e, i])``: the same seed, epoch
and index always give the same sample, whatever the worker or the order, so a resumed run sees
the same data. Call :meth:`DSRLPairs.set_epoch` before each epoch (DataLoader workers pick the
epoch up when they start, so do not use ``persistent_workers`` with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from training.augment import color_jitter, downscale_by_2, random_window, resize_image, resize_labels

from .readers import SegmentationDataset


@dataclass
class DSRLPairConfig:
    """Augmentation of DSRL pairs. Sizes are (height, width) in HR pixels."""

    crop_size: tuple[int, int] = (360, 480)  #: multiple of 2 * pad_multiple
    scale_range: tuple[float, float] = (0.5, 2.0)  #: HR image is rescaled by a factor from this range
    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    pad_multiple: int = 1  #: LR sizes are multiples of this (HR: of twice this)
    seed: int = 0


class DSRLPairs(Dataset):
    """(lr, hr, label) tensors from ``base``; augmented when ``train`` is true."""

    def __init__(self, base: SegmentationDataset, config: DSRLPairConfig | None = None, train: bool = True):
        self.base = base
        self.config = config or DSRLPairConfig()
        self.train = train
        self.epoch = 0
        step = 2 * self.config.pad_multiple
        if train and any(s % step for s in self.config.crop_size):
            raise ValueError(
                f"crop_size {self.config.crop_size} must be a multiple of 2 * pad_multiple = {step}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, labels = self.base[index]
        if self.train:
            rng = np.random.default_rng([self.config.seed, self.epoch, index])
            image, labels = self._augment(image, labels, rng)
        else:
            image, labels = _pad(
                image, labels, _round_up(labels.shape, 2 * self.config.pad_multiple), self.base.ignore_index
            )
        hr = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return downscale_by_2(hr), hr, torch.from_numpy(labels.astype(np.int64))

    def _augment(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        cfg = self.config
        scale = float(rng.uniform(*cfg.scale_range))
        (r0, r1, c0, c1), size = random_window(labels.shape, cfg.crop_size, scale, rng)
        image = resize_image(image[r0:r1, c0:c1], size)
        labels = resize_labels(labels[r0:r1, c0:c1], size)
        if cfg.flip and rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        image = color_jitter(image, rng, cfg.brightness, cfg.contrast, cfg.saturation)
        # where the scaled image is smaller than the crop, it sits at a random place in the canvas
        offset = (
            int(rng.integers(cfg.crop_size[0] - size[0] + 1)),
            int(rng.integers(cfg.crop_size[1] - size[1] + 1)),
        )
        return _pad(image, labels, cfg.crop_size, self.base.ignore_index, offset)


def _round_up(shape: tuple[int, ...], multiple: int) -> tuple[int, int]:
    return tuple(-(-int(s) // multiple) * multiple for s in shape[:2])


def _pad(image, labels, shape, ignore_index, offset=(0, 0)):
    if tuple(labels.shape) == tuple(shape):
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)
    canvas = np.zeros((*shape, 3), np.float32)
    label_canvas = np.full(shape, ignore_index, np.int64)
    (y, x), (h, w) = offset, labels.shape
    canvas[y : y + h, x : x + w] = image
    label_canvas[y : y + h, x : x + w] = labels
    return canvas, label_canvas
