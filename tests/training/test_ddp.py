"""The DDP path of training.loop on CPU: 2 gloo processes match one process on the same global batch."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from training.loop import LoopConfig, train_loop


class Points(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(100 * epoch + index)
        x = torch.randn(4, generator=g)
        return x, torch.tanh(x).sum(0, keepdim=True)


def _model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _loss(net, batch):
    x, y = batch
    loss = torch.nn.functional.mse_loss(net(x), y)
    return loss, {}


CFG = LoopConfig(steps=6, batch_size=4, lr=0.05, ckpt_every=100, log_every=1)


def _worker(rank, port, run_dir, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    train_loop(model, _loss, Points(), CFG, run_dir, device="cpu")
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()  # neither rank tears gloo down while the other still uses it (it aborts otherwise)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    single = _model()
    train_loop(single, _loss, Points(), CFG, tmp_path / "single", device="cpu")
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), tmp_path / "ddp", out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5)  # all-reduce sums in another order
    assert (tmp_path / "ddp" / "state").is_dir()  # rank 0 wrote the checkpoint
    # the single-process weights moved: the comparison is not trivially between two initial models
    assert not torch.allclose(single.state_dict()["0.weight"], _model().state_dict()["0.weight"])
