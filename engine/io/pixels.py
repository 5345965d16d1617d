"""Image and label arrays as the engine takes them: images as float32 RGB in [0, 1], labels as
uint8/uint16 class ids. The one place pixel values are normalised."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FineMaskError


def labels_from_array(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Check a class-index array and return it as uint8 or uint16 (H, W)."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or 0 in arr.shape:
        raise FineMaskError(f"a label map must be a non-empty 2-D array, found shape {arr.shape}", path)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            arr = arr.astype(np.int64)
        else:
            raise FineMaskError(f"unsupported label dtype {arr.dtype}: labels must be integer class ids", path)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise FineMaskError(f"class ids must lie in 0..65535, found {lo}..{hi}", path)
    return arr.astype(np.uint8 if hi < 256 else np.uint16)


def image_from_array(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Normalise an image array to float32 RGB ``(H, W, 3)`` in [0, 1].

    Accepts (H, W), (H, W, C) or channel-first (C, H, W) with C in 1..4 (2 = gray + alpha,
    4 = RGBA; alpha is dropped); uint8, uint16, bool, or float already in [0, 1].
    """
    arr = np.asarray(arr)
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise FineMaskError(f"not a 2-D image: array shape {arr.shape}", path)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        raise FineMaskError(
            f"unsupported channel count: array shape {arr.shape} has no axis of 1-4 channels (first or last)", path
        )
    if min(arr.shape[:2]) < 1:
        raise FineMaskError(f"image has zero size {arr.shape}", path)
    if arr.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise FineMaskError("image contains NaN or infinite values", path)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise FineMaskError(f"float image values must lie in [0, 1], found {lo:g}..{hi:g}", path)
    elif arr.dtype not in (np.uint8, np.uint16, bool):
        raise FineMaskError(f"unsupported pixel type {arr.dtype} (use 8/16-bit integers or float in [0, 1])", path)
    return unit_rgb(arr, copy=True)


def unit_rgb(crop: np.ndarray, *, copy: bool = False) -> np.ndarray:
    """An image (crop) (h, w[, C]) as float32 RGB (h, w, 3) in [0, 1], without checks.

    Integers are divided by their dtype's largest value (uint8 by 255, uint16 by 65535), bool and
    floats are taken as they are (use :func:`image_from_array` to check values and layouts); gray
    is repeated to RGB and a last alpha channel (C = 2 or 4) dropped. One float32 result, written
    in place: no intermediate copies. A float32 RGB (or RGBA) input comes back as itself (a view)
    unless ``copy``.
    """
    if crop.ndim == 2:
        crop = crop[:, :, None]
    channels = crop.shape[2]
    if channels in (2, 4):
        crop = crop[:, :, : channels - 1]  # alpha dropped (a view)
    elif channels > 4:
        crop = crop[:, :, :3]
    if crop.dtype == np.float32 and crop.shape[2] == 3 and not copy:
        return crop
    scale = float(np.iinfo(crop.dtype).max) if crop.dtype.kind in "iu" else 1.0
    out = np.empty((crop.shape[0], crop.shape[1], 3), np.float32)
    np.divide(crop, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")
    return out
