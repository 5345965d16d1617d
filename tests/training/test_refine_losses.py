"""CascadePSP refinement losses on small tensors against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.models.cascadepsp import OUTPUT_NAMES
from training.refine_losses import edge_map, gradient_loss, refinement_loss

LN2 = math.log(2.0)


def _numpy_edge(x: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Direct definition: zero-padded 3x3 mean (divide by 9), Sobel/4 with zero padding."""
    h, w = x.shape
    p = np.pad(x, 1)
    m = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    q = np.pad(m, 1)
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]]) / 4
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]]) / 4
    gx = sum(kx[a, b] * q[a:a + h, b:b + w] for a in range(3) for b in range(3))
    gy = sum(ky[a, b] * q[a:a + h, b:b + w] for a in range(3) for b in range(3))
    return np.sqrt(gx ** 2 + gy ** 2 + eps)


def test_edge_map_of_a_vertical_step_by_hand():
    x = torch.zeros(1, 1, 5, 5)
    x[..., 2:] = 1
    e = edge_map(x)
    # mean filter on interior rows: columns -> 0, 1/3, 2/3, 1, 2/3 (zero padding counted);
    # Sobel-x/4 at (2, 2): (1 + 2 + 1)/4 * (1/3 - 1) = -2/3; Sobel-y is 0 there
    assert e[0, 0, 2, 2].item() == pytest.approx(math.sqrt(4 / 9 + 1e-4), rel=1e-6)
    np.testing.assert_allclose(e[0, 0].numpy(), _numpy_edge(x[0, 0].numpy()), rtol=1e-5)


def test_gradient_loss_is_zero_for_equal_maps_and_l1_of_edges_otherwise():
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(2, 1, 9, 11, generator=g) > 0.5).float()
    prob = torch.rand(2, 1, 9, 11, generator=g)
    assert gradient_loss(gt, gt).item() == 0.0
    expect = np.mean([np.abs(_numpy_edge(prob[i, 0].numpy()) - _numpy_edge(gt[i, 0].numpy())).mean() for i in range(2)])
    assert gradient_loss(prob, gt).item() == pytest.approx(expect, rel=1e-5)


def test_total_loss_with_uncertain_predictions_and_soft_ground_truth():
    # logits 0 -> p = 0.5; gt 0.5 everywhere -> hard target 0: every BCE is ln 2, L1 = L2 = 0,
    # and the edge maps are equal. Total: three OS8 terms (1 x ln 2) + two OS4 terms (0.5 x ln 2).
    out = {name: torch.zeros(2, 1, 8, 8) for name in OUTPUT_NAMES}
    total, parts = refinement_loss(out, torch.full((2, 1, 8, 8), 0.5))
    assert total.item() == pytest.approx(4 * LN2, rel=1e-6)
    assert parts["pass3_os1/grad"].item() == pytest.approx(0.0, abs=1e-7)
    assert "pass3_os1/ce" not in parts  # OS1 has no BCE term


def test_total_loss_with_a_confident_ground_truth():
    out = {name: torch.zeros(1, 1, 6, 7) for name in OUTPUT_NAMES}
    gt = torch.ones(1, 1, 6, 7)
    total, parts = refinement_loss(out, gt)
    grad = np.abs(_numpy_edge(np.full((6, 7), 0.5)) - _numpy_edge(np.ones((6, 7)))).mean()
    os8 = LN2
    os4 = 0.5 * LN2 + 0.25 * 0.5 + 0.25 * 0.25
    os1 = 0.5 + 0.25 + 5 * grad
    assert total.item() == pytest.approx(3 * os8 + 2 * os4 + os1, rel=1e-5)
    assert parts["pass2_os4/l1"].item() == pytest.approx(0.5)
    assert parts["pass2_os4/l2"].item() == pytest.approx(0.25)


def test_all_six_outputs_receive_gradient_and_missing_ones_are_skipped():
    g = torch.Generator().manual_seed(1)
    out = {name: torch.randn(2, 1, 8, 8, generator=g, requires_grad=True) for name in OUTPUT_NAMES}
    gt = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    total, _ = refinement_loss(out, gt)
    total.backward()
    for name, t in out.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    local = {k: v.detach() for k, v in out.items() if not k.startswith("pass1")}
    part_total, parts = refinement_loss(local, gt)
    assert not any(k.startswith("pass1") for k in parts)
    assert part_total.item() == pytest.approx(total.item() - parts_of(out, gt, "pass1_os8"), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        refinement_loss({"pass3_os1": torch.zeros(1, 1, 4, 4)}, gt)


def parts_of(out, gt, name) -> float:
    _, parts = refinement_loss({k: v.detach() for k, v in out.items()}, gt)
    return parts[f"{name}/ce"].item()
