"""Augmentation on numpy arrays, driven by an explicit ``np.random.Generator``.

Images are float32 (H, W, 3) in [0, 1]; label maps are integer (H, W); masks are bool (H, W).
Every random choice comes from the generator passed in, so a sample is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.preprocess import resize as _resize_tensor

_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as torchvision


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W) or (H, W, C) float to ``shape``, anti-aliased when shrinking.

    Same filter as inference (``engine.preprocess.resize``: torch bilinear, antialias on shrink).
    """
    shape = (int(shape[0]), int(shape[1]))
    if image.shape[:2] == shape:
        return image
    arr = np.asarray(image, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(arr[..., None] if arr.ndim == 2 else arr)).permute(2, 0, 1)
    out = _resize_tensor(x[None], shape)[0].permute(1, 2, 0).numpy()
    return out[..., 0] if arr.ndim == 2 else out


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres aligned, like align_corners=False)."""
    h, w = labels.shape[:2]
    if (h, w) == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask by resizing it as a float map and thresholding at 0.5."""
    return resize_image(mask.astype(np.float32), shape) > 0.5


def downscale_by_2(hr: torch.Tensor) -> torch.Tensor:
    """The LR input of a DSRL pair: (B, 3, H, W) or (3, H, W) with even H, W -> half size.

    Torch bilinear with anti-aliasing (the filter inference uses to reach the working size).
    """
    x = hr[None] if hr.dim() == 3 else hr
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"HR size {h}x{w} must be even to halve exactly")
    out = _resize_tensor(x, (h // 2, w // 2)).clamp_(0.0, 1.0)
    return out[0] if hr.dim() == 3 else out


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
) -> np.ndarray:
    """torchvision-style ColorJitter: factors drawn from [1 - x, 1 + x], applied in random order."""
    out = np.asarray(image, np.float32)
    factors = {
        "brightness": rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
        "contrast": rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
        "saturation": rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
    }
    for name in rng.permutation(list(factors)):
        f = float(factors[name])
        if name == "brightness":
            out = out * f
        elif name == "contrast":
            out = _blend(out, np.float32(grayscale(out).mean()), f)
        else:
            out = _blend(out, grayscale(out)[..., None], f)
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32, copy=False)


def grayscale(image: np.ndarray) -> np.ndarray:
    """Luma (H, W) of an RGB image (H, W, 3)."""
    return image @ _GRAY_WEIGHTS


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.1) -> np.ndarray:
    """With probability ``p``, replace the image by its luma repeated on 3 channels."""
    if rng.random() < p:
        return np.repeat(grayscale(image)[..., None], 3, axis=-1).astype(np.float32)
    return image


def random_window(
    shape: tuple[int, int],
    out_size: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
    contains: tuple[int, int] | None = None,
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """A source window that, resized by ``scale``, gives (at most) ``out_size`` pixels.

    Returns ``((r0, r1, c0, c1), (h, w))``: the window in source pixels and its size after
    scaling, which is ``out_size`` clipped to the scaled image. With ``contains=(r, c)`` the
    window holds that source pixel (not on the window's last row/column where possible).
    """
    H, W = shape
    hs, ws = max(1, round(H * scale)), max(1, round(W * scale))
    vh, vw = min(out_size[0], hs), min(out_size[1], ws)
    # window size in source pixels (at least 1, at most the image)
    sh, sw = min(H, max(1, round(vh / scale))), min(W, max(1, round(vw / scale)))
    if contains is None:
        r0, c0 = int(rng.integers(0, H - sh + 1)), int(rng.integers(0, W - sw + 1))
    else:
        r0 = _start_containing(contains[0], sh, H, rng)
        c0 = _start_containing(contains[1], sw, W, rng)
    return (r0, r0 + sh, c0, c0 + sw), (vh, vw)


def _start_containing(p: int, size: int, total: int, rng: np.random.Generator) -> int:
    lo, hi = max(0, p - size + 2), min(p, total - size)  # p in [start, start + size - 2]
    if lo > hi:
        lo, hi = max(0, p - size + 1), min(p, total - size)
    return int(rng.integers(lo, hi + 1))


def _blend(image: np.ndarray, other, factor: float) -> np.ndarray:
    return factor * image + (1.0 - factor) * other
