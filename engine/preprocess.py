"""Tensor conversions and resizing shared by inference and training."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: ImageNet statistics every model here normalises its RGB input with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, H, W) float32 tensor (shares memory where possible)."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)


def fit_longer_side(height: int, width: int, longer: int) -> tuple[int, int]:
    """(h, w) with the longer side equal to ``longer`` and the aspect ratio kept (each >= 1)."""
    scale = longer / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W); antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad (B, C, H, W) at the bottom/right to multiples of ``multiple``; returns (x, (H, W))."""
    h, w = x.shape[-2:]
    ph = math.ceil(h / multiple) * multiple - h
    pw = math.ceil(w / multiple) * multiple - w
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def _source_index(out_len: int, in_len: int, start: int, stop: int, device) -> tuple[torch.Tensor, ...]:
    """Indices and weights of bilinear (half-pixel, align_corners=False) sampling along one axis."""
    pos = (torch.arange(start, stop, device=device, dtype=torch.float64) + 0.5) * (in_len / out_len) - 0.5
    pos = pos.clamp(min=0)
    i0 = pos.floor().long().clamp(max=in_len - 1)
    i1 = (i0 + 1).clamp(max=in_len - 1)
    w1 = (pos - i0).to(torch.float32)
    return i0, i1, w1


def upsample_rows(low: torch.Tensor, size: tuple[int, int], row_start: int, row_stop: int) -> torch.Tensor:
    """Rows ``row_start:row_stop`` of the bilinear upsampling of ``low`` (C, h, w) to ``size``.

    Equals ``F.interpolate(low[None], size, mode="bilinear", align_corners=False)[0]`` on those
    rows, but only ever holds a strip, so full-size results can be built in bounded memory.
    """
    (H, W), (h, w) = size, low.shape[-2:]
    y0, y1, wy = _source_index(H, h, row_start, row_stop, low.device)
    x0, x1, wx = _source_index(W, w, 0, W, low.device)
    low = low.float()
    rows = low[:, y0] * (1 - wy)[None, :, None] + low[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx
