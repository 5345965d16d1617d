"""training.evaluate.evaluate_refiner_crops and ``finemask evaluate refine-crops``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from app.cli import main
from engine.metrics import boundary_accuracy
from training.evaluate import evaluate_refiner_crops

TINY = {"stage_channels": [8, 8, 16, 16], "stage_blocks": [1, 1, 1, 1], "psp_channels": 16,
        "decoder_channels": [8, 8, 8], "head_channels": 8}


class ShiftedDisks:
    """A bright disk on a dark background; the coarse mask is the disk shifted by ``shift`` px."""

    def __init__(self, shift: int):
        self.shift = shift

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        yy, xx = np.mgrid[:32, :32]
        cy, cx, r = rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(5, 9)
        gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        coarse = ((yy - cy - self.shift) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        image = np.repeat((0.2 + 0.6 * gt)[None], 3, 0)
        return torch.from_numpy(image), torch.from_numpy(gt[None]), torch.from_numpy(coarse[None])


class FollowsTheImage(nn.Module):
    """A perfect 'refiner' for ShiftedDisks: foreground where the (normalised) image is bright."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image, seg):
        return {"pass3_os1": self.scale * image[:, :1]}  # red channel: 0.2 -> < 0, 0.8 -> > 0


class CopiesTheMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image, seg):
        return {"pass3_os1": self.scale * seg}


def test_crop_scores_per_source_and_overall():
    sets = {"small": ShiftedDisks(2), "large": ShiftedDisks(4)}
    perfect = evaluate_refiner_crops(FollowsTheImage(), sets, 6, batch_size=4)
    assert [r["source"] for r in perfect] == ["small", "large", "all"]
    assert [r["crops"] for r in perfect] == [6, 6, 12]
    for r in perfect:
        assert r["iou_after"] == 1.0 and r["mba_after"] == 1.0
        assert r["iou_before"] < 0.95 and r["mba_before"] < 0.95
    small, large, overall = perfect
    assert large["iou_before"] < small["iou_before"]  # a larger shift makes a worse coarse mask
    assert overall["iou_before"] == pytest.approx((small["iou_before"] + large["iou_before"]) / 2)
    _, gt, coarse = ShiftedDisks(2)[0]
    first = evaluate_refiner_crops(FollowsTheImage(), {"one": ShiftedDisks(2)}, 1)[0]
    assert first["mba_before"] == pytest.approx(boundary_accuracy(coarse[0].numpy() > 0.5, gt[0].numpy() > 0.5))

    same = evaluate_refiner_crops(CopiesTheMask(), sets, 6)
    for before, after in zip(perfect, same):
        assert after["iou_after"] == after["iou_before"] == before["iou_before"]
        assert after["mba_after"] == after["mba_before"]


def test_cli_refine_crops_prints_and_records(tmp_path, capsys, monkeypatch):
    from engine.checkpoints import read_card
    from engine.models.cascadepsp import RefinerConfig, build_refinement_module
    from training import train_refine
    from training.data import refine_crops

    configs = []

    def fake_crops(split, sources, length, config):
        configs.append(config)
        return ShiftedDisks(2 if sources == ("a",) else 4)

    monkeypatch.setattr(refine_crops, "build_refine_crops", fake_crops)
    model = build_refinement_module(RefinerConfig(backbone="light", **TINY))
    folder = train_refine.export_refiner(model, tmp_path / "m", name="tiny", training={"steps": 0})
    args = ["evaluate", "refine-crops", "--model", str(folder), "--sources", "a", "b", "--crops", "3"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["source"], r["crops"]) for r in rows] == [("a", 3), ("b", 3), ("all", 6)]
    assert rows[1]["iou_before"] < rows[0]["iou_before"]
    assert "crops_val_refine" not in read_card(folder).metrics
    assert main([*args, "--record"]) == 0
    table = capsys.readouterr().out
    assert "IoU before" in table and table.strip().splitlines()[-1].split()[:2] == ["all", "6"]
    assert read_card(folder).metrics["crops_val_refine"]["rows"] == rows
    assert {c.lowres_prob for c in configs} == {0.0}
    assert main([*args, "--lowres", "--record"]) == 0
    assert "low-resolution val crops" in capsys.readouterr().out
    assert configs[-1].lowres_prob == 1.0 and "crops_val_lowres_refine" in read_card(folder).metrics
