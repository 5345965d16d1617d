"""Losses of the CascadePSP refinement module, supervising all six cascade outputs.

Per output (logits at input size, see ``engine.models.cascadepsp.OUTPUT_NAMES``), with ``gt`` in
[0, 1] (soft allowed) and ``p = sigmoid(logits)``:

- OS8 outputs (pass 1, 2, 3): binary cross-entropy against ``gt > 0.5``;
- OS4 outputs (pass 2, 3): 0.5 * BCE + 0.25 * L1(p, gt) + 0.25 * L2(p, gt);
- OS1 output (pass 3): L1(p, gt) + L2(p, gt) + 5 * gradient loss.

These are the reference's default weights (``ce_weight = [0, 1, .5, 1, 1, .5]``, ``l1_weight =
l2_weight = [1, 0, .25, 0, 0, .25]``, ``grad_weight = 5`` for outputs ordered OS1, pass-1 OS8,
pass-2 OS4, pass-2 OS8, pass-3 OS8, pass-3 OS4). Gradient loss: both maps are smoothed by a 3 x 3
mean filter (zero padding counted), Sobel kernels divided by 4 give gx and gy, the edge map is
sqrt(gx^2 + gy^2 + 1e-4), and the loss is the L1 distance of the two edge maps. Every term is a
mean over all pixels of the batch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4
_SOBEL_Y = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 4


@dataclass(frozen=True)
class TermWeights:
    """Weights of the three per-output terms."""

    ce: float = 0.0
    l1: float = 0.0
    l2: float = 0.0


def _default_weights() -> dict[str, TermWeights]:
    os8, os4 = TermWeights(ce=1.0), TermWeights(ce=0.5, l1=0.25, l2=0.25)
    return {
        "pass3_os1": TermWeights(l1=1.0, l2=1.0),
        "pass1_os8": os8, "pass2_os8": os8, "pass3_os8": os8,
        "pass2_os4": os4, "pass3_os4": os4,
    }


@dataclass
class RefineLossConfig:
    """Per-output term weights and the weight of the OS1 gradient loss."""

    weights: dict[str, TermWeights] = field(default_factory=_default_weights)
    grad_weight: float = 5.0
    grad_eps: float = 1e-4


def edge_map(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, C, H, W) -> same-shape gradient magnitude after a 3 x 3 mean filter (see module doc)."""
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # count_include_pad=True, as the reference
    k = torch.stack([_SOBEL_X, _SOBEL_Y])[:, None].to(x)
    g = F.conv2d(x, k, padding=1)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + eps).reshape(b, c, h, w)


def gradient_loss(prob: torch.Tensor, gt: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """L1 distance between the edge maps of a probability map and the ground truth."""
    return F.l1_loss(edge_map(prob, eps), edge_map(gt, eps))


def refinement_loss(outputs: Mapping[str, torch.Tensor], gt: torch.Tensor,
                    config: RefineLossConfig | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts for one batch.

    outputs: logits (B, 1, H, W) by output name, as ``RefinementModule.forward`` returns them
    (outputs it did not return are skipped). gt: (B, 1, H, W) in [0, 1]. Parts are named
    ``"<output>/ce"``, ``"<output>/l1"``, ``"<output>/l2"``, ``"pass3_os1/grad"`` (unweighted)
    and ``"total"``.
    """
    config = config or RefineLossConfig()
    gt = gt.float()
    hard = (gt > 0.5).float()
    parts: dict[str, torch.Tensor] = {}
    total = gt.new_zeros(())
    for name, w in config.weights.items():
        if name not in outputs:
            continue
        logits = outputs[name].float()
        if logits.shape != gt.shape:
            raise ValueError(f"output {name} has shape {tuple(logits.shape)}, ground truth {tuple(gt.shape)}")
        prob = torch.sigmoid(logits)
        if w.ce:
            parts[f"{name}/ce"] = F.binary_cross_entropy_with_logits(logits, hard)
            total = total + w.ce * parts[f"{name}/ce"]
        if w.l1:
            parts[f"{name}/l1"] = F.l1_loss(prob, gt)
            total = total + w.l1 * parts[f"{name}/l1"]
        if w.l2:
            parts[f"{name}/l2"] = F.mse_loss(prob, gt)
            total = total + w.l2 * parts[f"{name}/l2"]
        if name == "pass3_os1" and config.grad_weight:
            parts["pass3_os1/grad"] = gradient_loss(prob, gt, config.grad_eps)
            total = total + config.grad_weight * parts["pass3_os1/grad"]
    parts["total"] = total
    return total, parts
