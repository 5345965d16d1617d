"""Data-dependent upsampling (DUpsampling, Tian et al. CVPR 2019).

The decoder predicts, at the deep features' resolution, a code of ``C'`` numbers per pixel; a
fixed matrix ``W`` (C' x r*r*C) maps each code to an r x r patch of ``C`` class scores, which a
pixel shuffle lays out at the full input resolution (r = output stride). ``W`` comes from a PCA
of the one-hot r x r patches of the training labels (:func:`fit_basis`) and is a persistent
buffer, saved with the weights.

Patch vectors are ordered like ``torch.nn.functional.pixel_unshuffle``: entry ``c*r*r + i*r + j``
is class ``c`` at row ``i``, column ``j`` of the patch. Nothing assumes square images.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Cancelled
from .layers import ConvBNAct

# Largest one-hot block (elements) built at once while fitting, to bound memory on big label maps.
_BLOCK_ELEMENTS = 1 << 22


def _label_maps(labels: Any) -> Iterator[np.ndarray | torch.Tensor]:
    """Yield 2-D label maps from a (H, W) or (N, H, W) array/tensor or an iterable of (H, W) maps."""
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        if labels.ndim == 2:
            yield labels
            return
        if labels.ndim == 3:
            yield from labels
            return
        raise ValueError(f"labels must be (H, W) or (N, H, W), got shape {tuple(labels.shape)}")
    for item in labels:
        if getattr(item, "ndim", None) != 2:
            raise ValueError("each label map must be a 2-D (H, W) array")
        yield item


def label_patches(label_map: np.ndarray | torch.Tensor, num_classes: int, ratio: int) -> Iterator[torch.Tensor]:
    """One-hot r x r patches of one (H, W) label map as blocks of rows, each (M, r*r*C) float64.

    The map is cropped to multiples of ``ratio`` (partial patches at the bottom/right are
    dropped). Pixels whose label is outside ``[0, num_classes)`` (void, e.g. 255) give all-zero
    one-hot vectors. (The reference implementation relabels void as class 0 instead, which
    teaches W patches of a class that is not there.)
    """
    lab = label_map.detach().cpu() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    h, w = (lab.shape[0] // ratio) * ratio, (lab.shape[1] // ratio) * ratio
    if h == 0 or w == 0:
        return
    rows = max(1, _BLOCK_ELEMENTS // (w * num_classes * ratio))  # patch rows per block
    for y0 in range(0, h, rows * ratio):
        strip = lab[y0 : min(h, y0 + rows * ratio), :w]
        # widen per strip (uint16 label maps have few torch ops; int64 of a whole map is large)
        strip = strip.long() if isinstance(strip, torch.Tensor) else torch.from_numpy(strip.astype(np.int64))
        valid = (strip >= 0) & (strip < num_classes)
        onehot = F.one_hot(strip.clamp(0, num_classes - 1), num_classes) * valid.unsqueeze(-1)
        onehot = onehot.permute(2, 0, 1).unsqueeze(0).to(torch.float64)  # (1, C, hs, w)
        patches = F.pixel_unshuffle(onehot, ratio)  # (1, r*r*C, hs/r, w/r)
        yield patches.reshape(patches.shape[1], -1).t()


def fit_basis(
    labels: Any,
    num_classes: int,
    ratio: int,
    channels: int,
    *,
    on_progress: Callable[[int, int, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """PCA basis ``W`` (channels, ratio*ratio*num_classes), float32, orthonormal rows.

    ``labels``: a (H, W) or (N, H, W) integer array/tensor, or an iterable of (H, W) maps of any
    sizes (at the resolution the decoder outputs, i.e. the model's input resolution). Each map's
    one-hot r x r patches ``x`` are collected; ``W`` holds the top eigenvectors of the second-
    moment matrix ``sum x x^T``, so ``x W^T W`` is the best rank-``channels`` linear
    reconstruction of the patches: exact when ``channels = r*r*C``, and with the same error as
    truncating the SVD of the patch matrix otherwise. (No mean is subtracted: the decoder
    applies ``W`` linearly, without an offset term.) Signs are fixed so the largest-magnitude
    entry of each row is positive, which makes the result deterministic.
    """
    if ratio < 1 or num_classes < 1:
        raise ValueError("ratio and num_classes must be positive")
    dim = ratio * ratio * num_classes
    if not 1 <= channels <= dim:
        raise ValueError(f"channels must be in [1, ratio*ratio*num_classes = {dim}], got {channels}")
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        total = 1 if labels.ndim == 2 else len(labels)
    else:
        total = len(labels) if hasattr(labels, "__len__") else 0  # 0: unknown (a generator)
    for done, label_map in enumerate(_label_maps(labels)):
        if cancel is not None and cancel():
            raise Cancelled("fit_basis cancelled")
        for block in label_patches(label_map, num_classes, ratio):
            gram += block.t() @ block
            count += block.shape[0]
        if on_progress is not None:
            on_progress(done + 1, total, "fitting DUpsampling basis")
    if count == 0:
        raise ValueError(f"no label map holds a full {ratio}x{ratio} patch")
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues, orthonormal eigenvectors
    basis = vectors.flip(1)[:, :channels].t().contiguous()
    return _fix_signs(basis).to(torch.float32)


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    idx = basis.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(torch.gather(basis, 1, idx))
    signs[signs == 0] = 1
    return basis * signs


def default_basis(num_classes: int, ratio: int, channels: int) -> torch.Tensor:
    """A label-free orthonormal starting basis: per class, the 2-D DCT-II basis of an r x r
    patch, lowest frequencies first. Its first ``num_classes`` rows (the constant functions)
    make DUpsampling start as nearest-neighbour upsampling of per-class scores. Replace it
    with :func:`fit_basis` on the training labels before training."""
    dim = ratio * ratio * num_classes
    if not 1 <= channels <= dim:
        raise ValueError(f"dup channels must be in [1, ratio*ratio*num_classes = {dim}], got {channels}")
    n = torch.arange(ratio, dtype=torch.float64)
    dct = torch.stack([torch.cos(math.pi * (2 * n + 1) * u / (2 * ratio)) for u in range(ratio)])
    dct[0] *= math.sqrt(1 / ratio)
    dct[1:] *= math.sqrt(2 / ratio)
    order = sorted(
        ((u, v, c) for u in range(ratio) for v in range(ratio) for c in range(num_classes)),
        key=lambda t: (t[0] + t[1], max(t[0], t[1]), t[0], t[2]),
    )[:channels]
    basis = torch.zeros(channels, num_classes, ratio, ratio, dtype=torch.float64)
    for row, (u, v, c) in enumerate(order):
        basis[row, c] = torch.outer(dct[u], dct[v])
    return basis.reshape(channels, dim).to(torch.float32)


def reconstruct(codes: torch.Tensor, basis: torch.Tensor, ratio: int) -> torch.Tensor:
    """Map codes (B, C', h, w) through ``basis`` (C', r*r*C) to scores (B, C, h*r, w*r)."""
    weight = basis.t().to(codes.dtype)[:, :, None, None]
    return F.pixel_shuffle(F.conv2d(codes, weight), ratio)


class DUpsamplingDecoder(nn.Module):
    """DUpsampling decoder: the stride-4 skip is average-pooled DOWN to the deep features' size,
    projected (1x1), concatenated with the deep features, fused by two 3x3 conv-BN-ReLU, mapped
    to codes by a 1x1 conv with bias, reconstructed through ``basis`` and divided by a learned
    temperature ``T`` (initialised to 1). Output: logits (B, C, H, W) at the input resolution.
    """

    outputs_logits = True
    out_stride = 1

    def __init__(
        self,
        deep_channels: int,
        low_channels: int,
        output_stride: int,
        num_classes: int,
        dup_channels: int = 64,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ratio = output_stride
        self.num_classes = num_classes
        self.low_pool = output_stride // 4
        self.skip = ConvBNAct(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(deep_channels + low_level_channels, decoder_channels, 3),
            nn.Dropout(dropout),
            ConvBNAct(decoder_channels, decoder_channels, 3),
        )
        self.to_codes = nn.Conv2d(decoder_channels, dup_channels, 1, bias=True)
        self.register_buffer("basis", default_basis(num_classes, self.ratio, dup_channels), persistent=True)
        self.temperature = nn.Parameter(torch.ones(1))
        self.out_channels = num_classes

    def forward(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        if self.low_pool > 1:
            low = F.avg_pool2d(low, self.low_pool)
        x = self.fuse(torch.cat([deep, self.skip(low)], dim=1))
        scores = reconstruct(self.to_codes(x), self.basis, self.ratio)
        # Lower bound only guards against division by ~0; T stays near 1 in practice.
        return scores / self.temperature.clamp(min=1e-3)

    @torch.no_grad()
    def set_basis(self, basis: torch.Tensor | np.ndarray) -> None:
        """Replace ``W`` (from :func:`fit_basis`); the shape must be (C', r*r*C)."""
        basis = torch.as_tensor(basis, dtype=torch.float32)
        if tuple(basis.shape) != tuple(self.basis.shape):
            raise ValueError(
                f"DUpsampling basis must have shape {tuple(self.basis.shape)} "
                f"(dup_channels, ratio*ratio*num_classes with ratio={self.ratio}), got {tuple(basis.shape)}"
            )
        self.basis.copy_(basis)
