"""training.evaluate: refinement IoU / mBA before and after, and the SR branch's PSNR / SSIM."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.cli import main
from engine.errors import FineMaskError
from engine.io import write_image
from engine.metrics import boundary_accuracy
from engine.segment import Segmenter
from training.evaluate import coarse_mask, evaluate_refiner, evaluate_sr, sr_model
from training.sr_target import bicubic_up
from training.tiny import make_tiny_segmenter


def disc(h=256, w=320, cy=120, cx=150, r=70) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


class Fundus:
    """Two images with a disc ('optic_disc') and a few specks ('exudates')."""

    classes = ["background", "optic_disc", "exudates"]

    def __init__(self):
        self.items = []
        for k in range(2):
            od = disc(cx=150 + 20 * k)
            ex = np.zeros_like(od)
            for y, x in [(30, 30), (200, 260), (60, 280)]:
                ex[y:y + 9 + k, x:x + 7] = True
            image = np.stack([0.2 + 0.6 * od, 0.2 + 0.3 * ex, np.full(od.shape, 0.3)], -1).astype(np.float32)
            self.items.append((image, {"optic_disc": od, "exudates": ex}))

    def __len__(self):
        return len(self.items)

    def stem(self, i):
        return f"img{i}"

    def binary_masks(self, i):
        image, masks = self.items[i]
        return image, dict(masks)


class Oracle:
    """'Refines' each mask to its ground truth (the evaluator goes image by image, class by class)."""

    def __init__(self, data):
        self.truths = [m for _, masks in data.items for m in masks.values()]

    def refine(self, image, mask, fast=False, L=900, skip_global=False):
        return self.truths.pop(0).astype(np.float32)


class Identity:
    def refine(self, image, mask, fast=False, L=900, skip_global=False):
        return mask.astype(np.float32)


def test_coarse_mask_loses_boundary_detail_but_keeps_the_object():
    gt = disc()
    coarse = coarse_mask(gt, 8)
    iou = np.count_nonzero(coarse & gt) / np.count_nonzero(coarse | gt)
    assert 0.95 < iou < 1.0  # a 70 px disc survives, its outline moves a little
    assert boundary_accuracy(coarse, gt) < 0.995
    specks = np.zeros((256, 320), bool)
    specks[40:46, 40:45] = True  # 6x5 px: thinner than the factor, mostly lost
    assert np.count_nonzero(coarse_mask(specks, 8) & specks) < 0.7 * specks.sum()


def test_evaluate_refiner_scores_before_and_after_per_class():
    data = Fundus()
    perfect = evaluate_refiner(Oracle(data), data, [0, 1])
    assert {(r["image"], r["class"], r["source"]) for r in perfect.rows} == {
        (f"img{i}", c, "gt/8") for i in (0, 1) for c in ("optic_disc", "exudates")}
    for r in perfect.rows:
        assert r["iou_after"] == 1.0 and r["mba_after"] == 1.0
        assert r["iou_before"] < 1.0 and r["mba_before"] < 1.0
    same = evaluate_refiner(Identity(), data, [0, 1])
    for r in same.rows:
        assert r["iou_after"] == r["iou_before"] and r["mba_after"] == r["mba_before"]
    summary = {(s["source"], s["class"]): s for s in same.summary()}
    od = [r["iou_before"] for r in same.rows if r["class"] == "optic_disc"]
    assert summary[("gt/8", "optic_disc")]["iou_before"] == pytest.approx(np.mean(od))
    assert summary[("gt/8", "all")]["images"] == 4
    assert summary[("gt/8", "exudates")]["iou_before"] < summary[("gt/8", "optic_disc")]["iou_before"]


def test_evaluate_refiner_adds_the_segmenters_masks(tmp_path):
    data = Fundus()
    folder = make_tiny_segmenter(tmp_path / "seg", num_classes=3, input_size=(64, 48))
    seg = Segmenter.from_pretrained(folder, device="cpu")
    seg.card.classes = list(data.classes)  # name the tiny model's classes like the data's
    scores = evaluate_refiner(Identity(), data, [0], segmenter=seg)
    rows = [r for r in scores.rows if r["source"] == "segmenter"]
    assert {r["class"] for r in rows} == {"optic_disc", "exudates"}
    labels = seg.predict(data.items[0][0]).labels
    gt = data.items[0][1]["optic_disc"]
    pred = labels == 1
    expected = np.count_nonzero(pred & gt) / max(1, np.count_nonzero(pred | gt))
    assert next(r for r in rows if r["class"] == "optic_disc")["iou_before"] == pytest.approx(expected)


class Upsampler(torch.nn.Module):
    """Stands in for a DSRL model: its 'SR branch' is bicubic upsampling plus ``offset``."""

    pad_multiple = 16

    def __init__(self, sr_target="image", offset=0.0):
        super().__init__()
        self.config = type("C", (), {"sr_target": sr_target})()
        self.offset = offset

    def forward(self, x):
        sr = bicubic_up(x) + self.offset if self.config.sr_target == "image" else torch.full_like(
            bicubic_up(x), self.offset)
        return type("Out", (), {"sr": sr})()


def sr_folder(tmp_path, n=2):
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = rng.random((36, 50, 3)).astype(np.float32)
        hr = np.clip(hr * 0.5 + np.linspace(0, 0.5, 50)[None, :, None], 0, 1)
        lr = torch.nn.functional.interpolate(torch.from_numpy(hr).permute(2, 0, 1)[None], size=(18, 25),
                                             mode="area")[0].permute(1, 2, 0).numpy()
        write_image(tmp_path / f"img_{i:03d}_SRF_2_HR.png", (hr * 255).round().astype(np.uint8))
        write_image(tmp_path / f"img_{i:03d}_SRF_2_LR.png", (lr * 255).round().astype(np.uint8))
    return tmp_path


def test_sr_psnr_equals_bicubic_for_a_bicubic_branch_and_drops_with_an_offset(tmp_path):
    folder = sr_folder(tmp_path)
    same = evaluate_sr(Upsampler(), folder)
    assert len(same.rows) == 2
    assert same.psnr == pytest.approx(same.bicubic_psnr) and same.ssim == pytest.approx(same.bicubic_ssim)
    assert 10 < same.bicubic_psnr < 40 and 0 < same.bicubic_ssim < 1
    worse = evaluate_sr(Upsampler(offset=0.1), folder)
    assert worse.psnr < same.psnr - 3
    residual = evaluate_sr(Upsampler("residual", 0.0), folder)  # zero residual: bicubic itself
    assert residual.psnr == pytest.approx(same.bicubic_psnr)


def test_sr_needs_a_model_with_its_sr_branch(tmp_path):
    base = make_tiny_segmenter(tmp_path / "baseline", variant="baseline")
    with pytest.raises(FineMaskError, match="no SR branch"):
        sr_model(base)
    model = sr_model(make_tiny_segmenter(tmp_path / "dsrl"))
    assert model.sisr is not None


def test_cli_evaluate_sr_prints_both_rows(tmp_path, capsys):
    folder = sr_folder(tmp_path / "set")
    model = make_tiny_segmenter(tmp_path / "dsrl")
    assert main(["evaluate", "sr", "--model", str(model), str(folder)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    psnr_sr, psnr_bic = float(line[1]), float(line[3])
    assert psnr_bic > psnr_sr  # a random SR branch is far worse than bicubic


def test_cli_evaluate_record_stores_the_scores_in_the_card(tmp_path, capsys):
    from engine.checkpoints import read_card

    folder = sr_folder(tmp_path / "Set5" / "image_SRF_2")
    model = make_tiny_segmenter(tmp_path / "dsrl")
    before = read_card(model)
    assert main(["evaluate", "sr", "--model", str(model), str(folder), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert read_card(model).metrics == before.metrics  # nothing recorded without --record
    assert main(["evaluate", "sr", "--model", str(model), str(folder), "--record"]) == 0
    stored = read_card(model).metrics["sr_x2"]["Set5"]
    assert stored["psnr"] == pytest.approx(printed[str(folder)]["psnr"])
    assert {k: v for k, v in read_card(model).metrics.items() if k != "sr_x2"} == before.metrics
    other = sr_folder(tmp_path / "Set14" / "image_SRF_2")
    assert main(["evaluate", "sr", "--model", str(model), str(other), "--record"]) == 0
    stored = read_card(model).metrics["sr_x2"]
    assert set(stored) == {"Set5", "Set14"}  # a second set adds to the first, it does not replace it
