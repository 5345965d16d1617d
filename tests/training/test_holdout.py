"""training.holdout: a store without validation pairs is scored on a strip held back from each
training pair, a strip fine-tuning never trains on (issue 35, item 13)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.store import Store
from training.finetune import FinetuneConfig, finetune
from training.holdout import HELD_OUT, PairPart, part_of, split_at
from training.tiny import make_tiny_segmenter


def test_parts_split_the_longer_side_80_20_and_cover_the_pair():
    wide = np.arange(10 * 50).reshape(10, 50)
    train, held = part_of(wide, "train"), part_of(wide, "held")
    assert train.shape == (10, 40) and held.shape == (10, 10)
    np.testing.assert_array_equal(np.concatenate([train, held], axis=1), wide)
    tall = np.zeros((50, 10, 3))
    assert part_of(tall, "train").shape == (40, 10, 3) and part_of(tall, "held").shape == (10, 10, 3)
    assert split_at(2) == 1 and split_at(3) == 2  # both parts keep a pixel
    with pytest.raises(ValueError):
        part_of(wide, "validation")


def test_finetuning_trains_on_the_first_part_and_scores_base_and_new_model_on_the_strip(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    store = Store.open(tmp_path / "store")
    for i in range(2):  # two pairs: the store keeps both for training (no validation pair)
        image = np.clip(0.45 + 0.05 * rng.standard_normal((48, 80, 3)), 0, 1).astype(np.float32)
        labels = np.zeros((48, 80), np.uint8)
        labels[:, 64:] = 1  # class 1 lies only in the held-back strip (the last 16 of 80 columns)
        image[:, 64:] = (0.9, 0.1, 0.1)
        store.add(image, labels, origin="corrected", name=f"p{i}")
    assert not store.pairs("validation")
    loads = []
    original = PairPart.load

    def recorded(self, pair_id):
        image, labels = original(self, pair_id)
        loads.append((self.part, labels.shape, set(np.unique(labels).tolist())))
        return image, labels

    monkeypatch.setattr(PairPart, "load", recorded)
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 32))
    res = finetune(store, base, FinetuneConfig(steps=2, batch_size=2, crop=(32, 32)))
    assert res.finished
    for scores in (res.before, res.after):
        assert scores["validation"] == HELD_OUT and scores["pairs"] == 2
        assert scores["miou"] is not None and scores["pixel_accuracy"] is not None
        assert "class 1" in scores["per_class_iou"]  # the strip, with its class 1, was scored
    trained = [(shape, classes) for part, shape, classes in loads if part == "train"]
    scored = [(shape, classes) for part, shape, classes in loads if part == "held"]
    assert trained and all(shape == (48, 64) and classes == {0} for shape, classes in trained)
    assert scored and all(shape == (48, 16) and classes == {1} for shape, classes in scored)
    assert "held-back strip" in res.model_path.joinpath("card.json").read_text()
