"""training.resume: optimizer/scheduler state survives pack/unpack and a save/load exactly."""
from __future__ import annotations

import torch

from training.resume import load_state, pack, save_state, unpack


def _train(model, opt, steps, gen):
    for _ in range(steps):
        x = torch.randn(4, 3, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_pack_round_trip_keeps_types():
    obj = {1: {"a": torch.ones(2), "b": (1, 2.5)}, "c": [None, True, "s"], "d": torch.arange(3)}
    tensors, skel = pack(obj)
    back = unpack(tensors, skel)
    assert set(back) == {1, "c", "d"} and back[1]["b"] == (1, 2.5) and back["c"] == [None, True, "s"]
    assert torch.equal(back[1]["a"], obj[1]["a"]) and torch.equal(back["d"], obj["d"])


def test_saved_state_resumes_adamw_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    _train(model, opt, 3, gen)
    save_state(tmp_path / "s", {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()})
    _train(model, opt, 2, gen)
    expected = model.weight.detach().clone()

    state = load_state(tmp_path / "s")
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    opt2.load_state_dict(state["opt"])
    gen2 = torch.Generator()
    gen2.set_state(state["gen"])
    _train(model2, opt2, 2, gen2)
    assert torch.equal(model2.weight, expected)
