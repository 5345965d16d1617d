"""engine.checkpoints: safetensors + JSON card round trip, atomic folders, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from engine import checkpoints
from engine.checkpoints import ModelCard, load_checkpoint, read_card, resolve, save_checkpoint
from engine.errors import FineMaskError


def _card(**kw):
    return ModelCard(name="t", task="segmentation", architecture="dsrl", config={"num_classes": 3}, **kw)


def test_round_trip_and_half_storage(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).double()}
    card = _card(classes=["x", "y", "z"], palette=[[1, 2, 3]] * 3, input_size=[240, 180], metrics={"miou": 0.5})
    folder = save_checkpoint(tmp_path / "m", state, card, half=True)
    back, card2 = load_checkpoint(folder)
    assert card2.classes == ["x", "y", "z"] and card2.input_size == [240, 180] and card2.created
    assert back["a"].dtype == torch.float32 and torch.allclose(back["a"], state["a"], atol=1e-2)
    assert torch.equal(back["b"], state["b"])
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    assert (folder / "model.safetensors").stat().st_size < 3 * 4 * 4 + 1000  # stored as half


def test_existing_model_never_overwritten_by_default(tmp_path):
    folder = save_checkpoint(tmp_path / "m", {"a": torch.ones(1)}, _card())
    with pytest.raises(FineMaskError, match="already exists"):
        save_checkpoint(folder, {"a": torch.zeros(1)}, _card())
    assert load_checkpoint(folder)[0]["a"].item() == 1.0
    save_checkpoint(folder, {"a": torch.zeros(1)}, _card(), overwrite=True)
    assert load_checkpoint(folder)[0]["a"].item() == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old folders left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "m", {"a": torch.ones(1)}, _card())
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FineMaskError, match="no such model"):
        resolve("no-such-model")
    folder = save_checkpoint(tmp_path / "m", {"a": torch.ones(1)}, _card())
    (folder / "model.safetensors").write_bytes(b"\x80\x04 not safetensors, maybe a pickle")
    with pytest.raises(FineMaskError, match="safetensors"):
        load_checkpoint(folder)
    (folder / "card.json").write_text("{broken")
    with pytest.raises(FineMaskError, match="card"):
        read_card(folder)
    (folder / "card.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(FineMaskError, match="lacks the field"):
        read_card(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FineMaskError, match="not a FineMask model folder"):
        resolve(empty)
