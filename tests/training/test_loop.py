"""training.loop: exact resume, deterministic data order, logs."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from training.loop import EpochBatchSampler, LoopConfig, lr_factor, train_loop


class Noisy(Dataset):
    """Samples depend on (epoch, index) only, like the real datasets' augmentation."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(1000 * epoch + index)
        x = torch.randn(3, generator=g)
        return x, x.sum(0, keepdim=True) + 0.1 * torch.randn(1, generator=g)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def _loss(net, batch):
    x, y = batch
    loss = torch.nn.functional.mse_loss(net(x), y)
    return loss, {"loss_mse": loss.item()}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = LoopConfig(steps=12, batch_size=4, lr=0.05, ckpt_every=5, log_every=1)
    once = _model()
    train_loop(once, _loss, Noisy(), cfg, tmp_path / "once")

    calls = {"n": 0}

    def cancel_after_7():
        calls["n"] += 1
        return calls["n"] > 7

    twice = _model()
    first = train_loop(twice, _loss, Noisy(), cfg, tmp_path / "twice", cancel=cancel_after_7)
    assert first.step == 7 and not first.finished
    resumed = _model()  # a fresh process would start from new weights: resume must restore them
    second = train_loop(resumed, _loss, Noisy(), cfg, tmp_path / "twice", resume=True)
    assert second.finished and second.step == 12
    for a, b in zip(once.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    log = (tmp_path / "twice" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lr,time") and len(log) == 13


def test_sampler_order_is_independent_of_start_and_split_by_rank():
    full = list(EpochBatchSampler(10, 4, seed=1, start=0, steps=6))
    assert list(EpochBatchSampler(10, 4, seed=1, start=4, steps=6)) == full[4:]
    assert full[0] != full[2]  # epoch 1 is shuffled differently from epoch 0
    assert all(e == s // 2 for s, b in enumerate(full) for e, _ in b)
    ranks = [list(EpochBatchSampler(10, 4, 1, 0, 6, rank=r, world=2)) for r in (0, 1)]
    for s in range(6):
        assert sorted(ranks[0][s] + ranks[1][s]) == sorted(full[s])


def test_schedules():
    cfg = LoopConfig(steps=90, schedule="step")
    assert lr_factor(cfg, 0) == 1 and abs(lr_factor(cfg, 60) - 0.1) < 1e-12 and abs(lr_factor(cfg, 85) - 0.01) < 1e-12
    poly = LoopConfig(steps=100)
    assert lr_factor(poly, 0) == 1 and 0 < lr_factor(poly, 99) < 0.02
