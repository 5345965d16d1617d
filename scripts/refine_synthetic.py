"""Can a refiner learn to move a coarse mask onto image edges? A check on synthetic scenes.

PYTHONPATH=. python scripts/refine_synthetic.py /work/runs/synth --steps 400 [--mask-skip]

Scenes: one to three random polygons (overlaps cut holes) in one flat colour on another, plus
Gaussian noise; the coarse mask is CascadePSP's perturbation of the ground truth
(``training.perturb.perturb_mask``, IoU 0.8-1). The light refiner trains from scratch with the
trainer and loss of ``train refine`` (``--resume`` continues a run); 32 held-out scenes are then
scored (IoU and boundary accuracy of the pass-3 OS1 output, percent) against their coarse masks.
Here the right boundary is plain in the image, so a refiner that cannot beat its input has a
bug, not too little or too hard data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from skimage import draw
from torch.utils.data import Dataset

from engine.metrics import boundary_accuracy
from engine.models.cascadepsp import normalise_image
from training.loop import LoopConfig
from training.perturb import mask_iou, perturb_mask
from training.train_refine import RefineTrainConfig, train_refine


class PolygonScenes(Dataset):
    """(image [0, 1] (3, S, S), gt (1, S, S), coarse (1, S, S)) float tensors; a pure function of
    (base, epoch, index)."""

    def __init__(self, size: int = 224, length: int = 10000, base: int = 0):
        self.size, self.length, self.base, self.epoch = size, length, base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.base, self.epoch, index])
        s = self.size
        gt = np.zeros((s, s), bool)
        for _ in range(rng.integers(1, 4)):
            n = rng.integers(5, 12)
            cy, cx = rng.uniform(0.2, 0.8, 2) * s
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(0.1, 0.3) * s * rng.uniform(0.5, 1.2, n)
            rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), (s, s))
            gt[rr, cc] ^= True
        if not gt.any():
            gt[s // 4:s // 2, s // 4:s // 2] = True
        bg, fg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        while np.abs(bg - fg).sum() < 0.6:
            fg = rng.uniform(0, 1, 3)
        image = np.clip(np.where(gt[..., None], fg, bg) + rng.normal(0, 0.08, (s, s, 3)), 0, 1)
        coarse = perturb_mask(gt, rng)
        return (torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)),
                torch.from_numpy(gt[None].astype(np.float32)), torch.from_numpy(coarse[None].astype(np.float32)))


def score(model: torch.nn.Module, scenes: PolygonScenes) -> dict[str, float]:
    """Mean IoU and boundary accuracy (percent) of the coarse masks and of the refined ones."""
    model.eval()
    rows = []
    with torch.inference_mode():
        for i in range(len(scenes)):
            image, gt, coarse = scenes[i]
            logits = model(normalise_image(image[None]), coarse[None] * 2 - 1)["pass3_os1"]
            refined, gt, coarse = (logits[0, 0] > 0).numpy(), gt[0].numpy() > 0.5, coarse[0].numpy() > 0.5
            rows.append((mask_iou(coarse, gt), mask_iou(refined, gt),
                         boundary_accuracy(coarse, gt), boundary_accuracy(refined, gt)))
    names = ("iou_before", "iou_after", "mba_before", "mba_after")
    return {k: round(100 * float(v), 1) for k, v in zip(names, np.mean(rows, axis=0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask-skip", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = RefineTrainConfig(model={"mask_skip": args.mask_skip},
                            loop=LoopConfig(steps=args.steps, batch_size=8, lr=args.lr, schedule="poly",
                                            ckpt_every=50))
    model, _ = train_refine(cfg, args.run, resume=args.resume, crops=PolygonScenes(args.size))
    scores = score(model, PolygonScenes(args.size, length=32, base=1))
    (args.run / "synthetic_scores.json").write_text(json.dumps(scores, indent=2))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
