"""Losses of the DSRL segmenter: feature affinity (FA) and the total DSRL loss."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.models.dsrl import DSRLOutput

from .sr_target import residual_target

# Upper bound on the elements of one affinity block (rows x N). Two such float32 blocks live at
# a time (seg and SR affinities), so a block costs at most 2 * 4 * 2**24 B = 128 MiB.
FA_BLOCK_ELEMENTS = 1 << 24


def fa_rows_per_block(num_pixels: int, block_elements: int = FA_BLOCK_ELEMENTS) -> int:
    """Rows of the N x N affinity matrices computed at once for N = ``num_pixels``."""
    return max(1, min(num_pixels, block_elements // max(1, num_pixels)))


class _AffinityL1(torch.autograd.Function):
    """sum_b sum_ij |a_i.a_j - b_i.b_j| / (B N^2) for a (B, Ca, N), b (B, Cb, N), computed in row
    blocks; the backward recomputes the blocks instead of storing N x N matrices."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.rows = rows
        batch, _, n = a.shape
        total = torch.zeros((), dtype=torch.float64, device=a.device)
        for i in range(batch):
            for start in range(0, n, rows):
                block = a[i, :, start:start + rows].t() @ a[i]  # (rows, N)
                block.sub_(b[i, :, start:start + rows].t() @ b[i])
                total += block.abs_().sum(dtype=torch.float64)
        return (total / (batch * n * n)).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        rows = ctx.rows
        batch, _, n = a.shape
        scale = grad_out / (batch * n * n)
        grad_a = torch.zeros_like(a)
        grad_b = torch.zeros_like(b)
        for i in range(batch):
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                sign = a[i, :, start:stop].t() @ a[i]
                sign.sub_(b[i, :, start:stop].t() @ b[i])
                sign.sign_().mul_(scale)  # G[I, :], (rows, N)
                # d/da_n of sum_{i in I, j} G_ij a_i.a_j = [n in I] sum_j G_nj a_j + sum_{i in I} G_in a_i
                grad_a[i, :, start:stop] += a[i] @ sign.t()
                grad_a[i] += a[i, :, start:stop] @ sign
                grad_b[i, :, start:stop] -= b[i] @ sign.t()
                grad_b[i] -= b[i, :, start:stop] @ sign
        return grad_a, grad_b, None


def feature_affinity_loss(f_seg: torch.Tensor, f_sr: torch.Tensor, stride: int = 8,
                          block_elements: int = FA_BLOCK_ELEMENTS) -> torch.Tensor:
    """Feature-affinity loss of DSRL: mean over pixel pairs and batch of |S_seg - S_sr|.

    ``f_seg`` (B, Cs, H, W) and ``f_sr`` (B, Cr, H, W) are average-pooled by ``stride``, each
    pixel's feature vector is L2-normalised (all-zero vectors stay zero) and
    S = F^T F over all N = (H/stride)(W/stride) pixels. The N x N matrices are never formed
    whole: row blocks of at most ``block_elements`` entries are computed (and recomputed in
    the backward pass), so memory beyond the inputs is O(block_elements), not O(N^2).

    Deviation from the public reference (utils/fa_loss.py of Dootmaan/DSRL), which divides the
    L1 norm summed over the batch by N^2 and so scales with the batch size: this averages over
    the batch too, as the paper's definition does per image.
    """
    if f_seg.dim() != 4 or f_sr.dim() != 4:
        raise ValueError("feature maps must be (B, C, H, W)")
    if f_seg.shape[0] != f_sr.shape[0] or f_seg.shape[2:] != f_sr.shape[2:]:
        raise ValueError(f"feature maps differ in batch or size: {tuple(f_seg.shape)} vs {tuple(f_sr.shape)}")
    if f_seg.shape[2] < stride or f_seg.shape[3] < stride:
        raise ValueError(f"feature maps ({f_seg.shape[2]}x{f_seg.shape[3]}) are smaller than the stride {stride}")
    with torch.autocast(device_type=f_seg.device.type, enabled=False):
        a = F.normalize(F.avg_pool2d(f_seg.float(), stride).flatten(2), dim=1)
        b = F.normalize(F.avg_pool2d(f_sr.float(), stride).flatten(2), dim=1)
        rows = fa_rows_per_block(a.shape[2], block_elements)
        return _AffinityL1.apply(a, b, rows)


class DSRLLoss(NamedTuple):
    """Total loss and its unweighted terms (each a scalar tensor; zero when absent)."""

    total: torch.Tensor
    ce: torch.Tensor
    sr: torch.Tensor
    fa: torch.Tensor


def dsrl_loss(
    output: DSRLOutput,
    labels: torch.Tensor,
    hr: torch.Tensor | None = None,
    *,
    lr: torch.Tensor | None = None,
    sr_target: str = "image",
    sr_weight: float = 0.1,
    fa_weight: float = 1.0,
    fa_stride: int = 8,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
) -> DSRLLoss:
    """DSRL loss: CE(logits, labels; void ignored) + sr_weight * MSE + fa_weight * FA.

    ``labels`` (B, 2H, 2W) integer class indices at the output size, ``ignore_index`` for void;
    ``hr`` (B, 3, 2H, 2W) the high-resolution image in [0, 1] (needed when ``output.sr`` is
    set); ``lr`` (B, 3, H, W) the network input, needed for ``sr_target="residual"``.

    SR term: for ``"image"`` the MSE between ``output.sr`` and ``hr`` (as in DSRL). For
    ``"residual"`` the MSE between ``output.sr`` and the SRNet residual target
    (``training.sr_target.residual_target(hr, lr)``). SRNet itself trains that residual with
    an L1 loss as an auxiliary task next to its SR image loss; here the residual takes the
    place of DSRL's SR image in the same 0.1-weighted MSE, so the loss keeps DSRL's form.
    A batch whose labels are all void contributes a CE of zero (not NaN). ``class_weights``
    (C,) weight the CE per class (a weighted mean, as ``F.cross_entropy``); DSRL uses none.
    """
    logits = output.logits
    if labels.shape[-2:] != logits.shape[-2:] or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    labels = labels.long()
    zero = logits.new_zeros(())
    if (labels != ignore_index).any():
        weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
        ce = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index)
    else:
        ce = logits.sum() * 0.0
    sr = zero
    if output.sr is not None:
        if hr is None:
            raise ValueError("the model has an SISR branch: pass the HR image")
        if hr.shape != output.sr.shape:
            raise ValueError(f"HR image {tuple(hr.shape)} does not match the SR output {tuple(output.sr.shape)}")
        if sr_target == "residual":
            if lr is None:
                raise ValueError("sr_target='residual' needs the LR input image (lr=...)")
            target = residual_target(hr.float(), lr.float())
        elif sr_target == "image":
            target = hr.float()
        else:
            raise ValueError(f"sr_target must be 'image' or 'residual', got {sr_target!r}")
        sr = F.mse_loss(output.sr.float(), target)
    fa = zero
    if output.f_seg is not None and output.f_sr is not None and fa_weight:
        fa = feature_affinity_loss(output.f_seg, output.f_sr, fa_stride)
    total = ce + sr_weight * sr + fa_weight * fa
    return DSRLLoss(total, ce, sr, fa)
