"""Multi-process training on CPU (gloo): global BatchNorm, and ``torchrun -m training finetune``
matching one process on the same global batch."""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.segment import Segmenter
from engine.store import Store
from training.loop import LoopConfig, train_loop
from training.sync_bn import GlobalBatchNorm2d, globalise_batchnorm
from training.tiny import make_tiny_segmenter

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 5, 6, 7, generator=g) * 3 + 1, torch.randn(4, 5, 6, 7, generator=g)


def _bn() -> torch.nn.Module:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    torch.nn.init.uniform_(bn.bias, -1, 1)
    return bn


def _bn_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bn = globalise_batchnorm(torch.nn.Sequential(_bn()))[0]
    assert isinstance(bn, GlobalBatchNorm2d)
    x, target = _batch()
    x = x[2 * rank: 2 * rank + 2].requires_grad_()
    y = bn(x)
    loss = (y * target[2 * rank: 2 * rank + 2]).sum() / 4  # this rank's share of the global mean
    loss.backward()
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    for g in grads:
        dist.all_reduce(g)  # what DDP does with parameter gradients (sum of the shares)
    torch.save({"y": y.detach(), "x_grad": x.grad, "w_grad": grads[0], "b_grad": grads[1],
                "running": (bn.running_mean, bn.running_var)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_global_batchnorm_over_two_processes_equals_one_batch(tmp_path):
    x, target = _batch()
    x.requires_grad_()
    bn = _bn()
    y = bn(x)
    ((y * target).sum() / 4).backward()
    out = str(tmp_path / "bn")
    mp.spawn(_bn_worker, args=(_free_port(), out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad, atol=1e-5, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["w_grad"], bn.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p["b_grad"], bn.bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p["running"][0], bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p["running"][1], bn.running_var, atol=1e-5, rtol=1e-5)
    # plain per-process BatchNorm would differ: each half has its own statistics
    halves = torch.cat([_bn()(x[:2].detach()), _bn()(x[2:].detach())])
    assert (halves - y.detach()).abs().max() > 0.05


class Blobs(torch.utils.data.Dataset):
    """(epoch, index) -> a 3x8x8 image and the mean of its first channel as the target."""

    def __len__(self):
        return 16

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(1000 * epoch + index)
        x = torch.randn(3, 8, 8, generator=g) + index / 8
        return x, x[0].mean().reshape(1)


def _conv_bn_net() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1))


def _mse(net, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(net(x), y), {}


LOOP = LoopConfig(steps=8, batch_size=4, lr=0.01, ckpt_every=100, log_every=1)


def _loop_worker(rank: int, port: int, run_dir: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _conv_bn_net()
    result = train_loop(model, _mse, Blobs(), LOOP, run_dir, device="cpu")
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": [h["loss"] for h in result.history]}, out)
    dist.destroy_process_group()


def test_ddp_loop_with_batchnorm_matches_single_process(tmp_path):
    torch.set_num_threads(1)
    single = _conv_bn_net()
    losses = [h["loss"] for h in train_loop(single, _mse, Blobs(), LOOP, tmp_path / "one", device="cpu").history]
    out = tmp_path / "ddp.pt"
    mp.spawn(_loop_worker, args=(_free_port(), tmp_path / "ddp", out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    # the logged loss is the global batch's, step by step; a wrong data split or per-process
    # BatchNorm statistics would show at the first step already
    np.testing.assert_allclose(ddp["losses"], losses, rtol=1e-4, atol=1e-6)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single[0].weight, _conv_bn_net()[0].weight)


def _store(path: Path) -> Path:
    store = Store.open(path)
    rng = np.random.default_rng(0)
    for i in range(6):
        image = (0.4 + 0.1 * rng.random((48, 64, 3))).astype(np.float32)
        labels = np.zeros((48, 64), np.uint8)
        y, x = int(rng.integers(0, 20)), int(rng.integers(0, 30))
        image[y:y + 20, x:x + 24] = (0.9, 0.2, 0.1)
        labels[y:y + 20, x:x + 24] = 1
        store.add(image, labels, origin="corrected", name=f"p{i}")
    return path


def _losses(version: Path) -> list[float]:
    with open(version / "log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_torchrun_finetune_matches_single_process(tmp_path):
    """``torchrun -m training finetune`` on 2 gloo processes against one process, same global batch.

    The first step's loss (same weights, same global batch) must agree closely. After updates a
    tiny BatchNorm network trained with Adam amplifies float rounding: one process run with 1 and
    with 2 threads already differed by up to 9% within 6 steps (measured), so later steps are
    held to a 15% band only (the step losses themselves range over 50%, so a wrong data split
    still shows); exact multi-step equality is shown on a conditioned network above.
    """
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24), dropout=0.0)
    base_bytes = (base / "model.safetensors").read_bytes()
    one, two = _store(tmp_path / "one"), tmp_path / "two"
    shutil.copytree(one, two)
    args = ["--base", str(base), "--steps", "6", "--batch-size", "4", "--lr", "1e-4", "--crop", "32", "32",
            "--threads", "1", "--name", "v", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "training", "finetune", str(one), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "training", "finetune", str(two), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("wrote ") == 1  # rank 0 alone evaluates, writes and reports
    assert "before" in ddp.stdout and "after" in ddp.stdout
    v1, v2 = one / "models" / "v", two / "models" / "v"
    l1, l2 = _losses(v1), _losses(v2)
    assert len(l1) == len(l2) == 6
    np.testing.assert_allclose(l2[0], l1[0], rtol=1e-3)
    np.testing.assert_allclose(l2, l1, rtol=0.15)
    seg = Segmenter.from_pretrained(v2, device="cpu")
    assert seg.predict(np.full((24, 32, 3), 0.5, np.float32)).labels.shape == (24, 32)
    assert (base / "model.safetensors").read_bytes() == base_bytes
    assert not list((two / "models" / ".runs").glob("*/state"))  # the run folder was cleaned up
