"""training.train_refine: a tiny light refiner learns on synthetic crops and exports a loadable model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from engine.refine import Refiner
from training.loop import LoopConfig
from training.train_refine import RefineTrainConfig, export_refiner, train_refine

TINY = {"stage_channels": [8, 8, 16, 16], "stage_blocks": [1, 1, 1, 1], "psp_channels": 16,
        "decoder_channels": [8, 8, 8], "head_channels": 8}


class Disks(Dataset):
    """A bright disk on a dark background; the coarse mask is the disk shifted by a few pixels."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 8

    def __getitem__(self, index):
        rng = np.random.default_rng([self.epoch, index])
        yy, xx = np.mgrid[:32, :32]
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        coarse = ((yy - cy - 2) ** 2 + (xx - cx + 2) ** 2 < r**2).astype(np.float32)
        image = np.repeat((0.2 + 0.6 * gt)[None], 3, 0) + rng.normal(0, 0.02, (3, 32, 32))
        return (torch.from_numpy(image.astype(np.float32)), torch.from_numpy(gt[None]),
                torch.from_numpy(coarse[None]))


class TwoDisks(Dataset):
    """Two bright disks; the ground truth is one of them, the coarse mask a shifted, resized copy of it.

    The image alone does not say which disk is wanted and the mask alone not where its edge is,
    so beating the coarse mask needs both inputs."""

    def __init__(self, length=8, base=0):
        self.epoch, self.length, self.base = 0, length, base

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng([self.base, self.epoch, index])
        yy, xx = np.mgrid[:32, :32]
        r, cy = rng.uniform(4, 6, 2), rng.uniform(8, 24, 2)
        cx = np.array([rng.uniform(7, 11), rng.uniform(21, 25)])
        disks = [(yy - cy[k]) ** 2 + (xx - cx[k]) ** 2 < r[k] ** 2 for k in range(2)]
        k = rng.integers(2)
        dy, dx = rng.integers(-2, 3, 2)
        coarse = (yy - cy[k] - dy) ** 2 + (xx - cx[k] - dx) ** 2 < (r[k] * rng.uniform(0.7, 1.3)) ** 2
        image = np.repeat((0.2 + 0.6 * (disks[0] | disks[1]))[None], 3, 0) + rng.normal(0, 0.02, (3, 32, 32))
        return (torch.from_numpy(image.astype(np.float32)), torch.from_numpy(disks[k][None].astype(np.float32)),
                torch.from_numpy(coarse[None].astype(np.float32)))


def test_training_teaches_the_refiner_to_snap_the_chosen_mask_to_the_image_edge(tmp_path):
    """80 steps (about 10 s): refined masks of unseen scenes beat their coarse masks by far."""
    from engine.models.cascadepsp import normalise_image
    from training.perturb import mask_iou

    torch.manual_seed(0)
    cfg = RefineTrainConfig(model=TINY, loop=LoopConfig(steps=80, batch_size=8, lr=3e-3, ckpt_every=1000,
                                                          schedule="poly"))
    model, _ = train_refine(cfg, tmp_path / "run", crops=TwoDisks())
    model.eval()
    held_out = TwoDisks(32, base=99)
    before, after = [], []
    with torch.inference_mode():
        for image, gt, coarse in (held_out[i] for i in range(len(held_out))):
            refined = model(normalise_image(image[None]), coarse[None] * 2 - 1)["pass3_os1"][0, 0] > 0
            before.append(mask_iou(coarse[0] > 0.5, gt[0] > 0.5))
            after.append(mask_iou(refined.numpy(), gt[0] > 0.5))
    assert np.mean(before) < 0.65 and np.mean(after) > 0.9, (np.mean(before), np.mean(after))


def test_loss_falls_and_export_loads(tmp_path):
    cfg = RefineTrainConfig(model=TINY, loop=LoopConfig(steps=30, batch_size=4, lr=3e-3, log_every=1,
                                                          ckpt_every=100, schedule="poly"))
    model, result = train_refine(cfg, tmp_path / "run", crops=Disks())
    losses = [row["loss"] for row in result.history]
    assert result.finished and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    folder = export_refiner(model, tmp_path / "model", name="tiny-refiner", training={"steps": 30})
    loaded = Refiner.from_pretrained(folder).model.float().cpu().eval()
    image, _, coarse = (t[None] for t in Disks()[0])
    with torch.inference_mode():
        expected = model.cpu().eval()(image, coarse * 2 - 1)["pass3_os1"]
        got = loaded(image, coarse * 2 - 1)["pass3_os1"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "run" / "log.csv").exists()


def test_run_export_writes_the_runs_last_state(tmp_path):
    from app.cli import main
    from engine.checkpoints import load_checkpoint
    from training.resume import load_state

    cfg = RefineTrainConfig(model={**TINY, "mask_skip": True}, loop=LoopConfig(steps=3, batch_size=2, ckpt_every=100))
    train_refine(cfg, tmp_path / "run", crops=Disks())
    assert main(["train", "export", str(tmp_path / "run"), "--to", str(tmp_path / "m"), "--name", "r"]) == 0
    state, card = load_checkpoint(tmp_path / "m")
    saved = load_state(tmp_path / "run" / "state")["model"]
    assert card.task == "refinement" and card.training["steps"] == 3 and card.config["mask_skip"] is True
    for key, value in saved.items():  # floats stored in float16: equal to fp16 precision
        expected = value.half().float() if value.is_floating_point() else value
        torch.testing.assert_close(state[key], expected, atol=0, rtol=0)
    assert main(["train", "export", str(tmp_path), "--to", str(tmp_path / "x"), "--name", "x"]) == 2


def test_cli_options_reach_the_crops_and_the_model(tmp_path, monkeypatch):
    """``train refine --mask-skip --lowres-prob`` builds the skip model and mixes low-resolution masks."""
    import json

    from app.cli import main
    from engine.models.cascadepsp import RefinerConfig
    from training import train_refine as module

    built = []

    def fake_crops(sources, length, config):
        built.append((tuple(sources), length, config))
        return Disks()

    monkeypatch.setattr(module, "build_refine_crops", fake_crops)
    monkeypatch.setattr(module, "RefinerConfig", lambda **kw: RefinerConfig(**kw, **TINY))  # a tiny model
    args = ["train", "refine", "--mask-skip", "--lowres-prob", "0.3", "--sources", "idrid", "--crops-per-epoch",
            "8", "--steps", "2", "--batch-size", "2", "--run", str(tmp_path / "run")]
    assert main(args) == 0
    (sources, length, config), = built
    assert sources == ("idrid",) and length == 8 and config.lowres_prob == 0.3
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lowres_prob"] == 0.3 and saved["model"] == {"mask_skip": True}


def test_cli_rejects_a_lowres_share_outside_0_1(tmp_path, capsys):
    from app.cli import main

    with pytest.raises(SystemExit):
        main(["train", "refine", "--lowres-prob", "1.5", "--run", str(tmp_path / "run")])
    assert "--lowres-prob: must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
