"""Input checks and conversions; arrays are read one crop at a time, never converted whole."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FineMaskError
from ..io import unit_rgb  # noqa: F401 - the one image normaliser; refiner and labels import it from here


def check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise FineMaskError(f"image must be a numpy array, got {type(image).__name__}")
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
    if shape_ok and image.dtype.kind in "uifb":
        if min(image.shape[:2]) < 1:
            raise FineMaskError(f"image is empty (shape {image.shape})")
        return image
    raise FineMaskError(f"image must be (H, W, 3) uint8 or float in [0, 1], got shape {image.shape} "
                        f"dtype {image.dtype}")


def mask_binariser(mask: Any, shape: tuple[int, int]) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Validate ``mask`` against the image shape; return it (H, W) and a crop -> bool function.

    bool: as is; uint8: > 127 (a 0/1 uint8 mask, max <= 1, counts as > 0); other integers: > 0;
    float: > 0.5.
    """
    if not isinstance(mask, np.ndarray):
        raise FineMaskError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2 or mask.shape != tuple(shape):
        raise FineMaskError(f"mask shape {mask.shape} does not match the image size {tuple(shape)}")
    kind = mask.dtype.kind
    if kind == "b":
        return mask, lambda a: a
    if mask.dtype == np.uint8:
        if int(mask.max()) <= 1:
            return mask, lambda a: a > 0
        return mask, lambda a: a > 127
    if kind in "iu":
        return mask, lambda a: a > 0
    if kind == "f":
        return mask, lambda a: a > 0.5
    raise FineMaskError(f"mask must be bool, uint8 (0/255) or float, got dtype {mask.dtype}")


def global_size(height: int, width: int, L: int) -> tuple[int, int]:
    """Size (gh, gw) of the global step: longest side exactly ``L``, aspect ratio kept."""
    scale = L / max(height, width)
    gh = L if height >= width else max(1, math.floor(height * scale + 1e-6))
    gw = L if width > height else max(1, math.floor(width * scale + 1e-6))
    return gh, gw


def pad8(x: torch.Tensor, value: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


# --------------------------------------------------------------------------------------------
