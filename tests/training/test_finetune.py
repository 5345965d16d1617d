"""training.finetune: tiny models learn from a store; the base is untouched; runs resume and add classes."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoints import load_checkpoint, read_card
from engine.errors import FineMaskError
from engine.refine import Refiner
from engine.segment import Segmenter
from engine.store import Store
from training.finetune import (
    FinetuneConfig,
    extend_classes,
    finetune,
    list_versions,
    models_dir,
    next_version_name,
)
from training.tiny import make_tiny_refiner, make_tiny_segmenter

COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2)}
ROOT = Path(__file__).resolve().parents[2]


def scene(seed: int, classes=(1,), shape=(72, 96)) -> tuple[np.ndarray, np.ndarray]:
    """Gray noisy background (class 0) with one bright rectangle per class in ``classes``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    image = (0.45 + 0.05 * rng.standard_normal((h, w, 3))).astype(np.float32)
    labels = np.zeros(shape, np.uint16)
    for c in classes:
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        hh, ww = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        image[y : y + hh, x : x + ww] = COLOURS[c]
        labels[y : y + hh, x : x + ww] = c
    return np.clip(image, 0, 1), labels


def make_store(path: Path, n: int = 6, classes=(1,)) -> Store:
    store = Store.open(path)
    for i in range(n):
        image, labels = scene(i, classes)
        store.add(image, labels, origin="corrected", name=f"pair{i}")
    assert store.pairs("validation") and store.pairs("train")
    return store


def sha(folder: Path) -> str:
    return "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()))


FAST = dict(batch_size=4, lr=5e-3, crop=(64, 64), ckpt_every=5, log_every=1)


def test_loss_falls_base_untouched_and_version_written(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    before_bytes = sha(base)
    store = make_store(tmp_path / "store")
    seen = []
    res = finetune(store, base, FinetuneConfig(steps=60, **FAST), on_progress=lambda d, t, m: seen.append((d, t, m)))
    assert res.finished and res.steps == 60 and sha(base) == before_bytes
    losses = [row["loss"] for row in res.history]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert res.after["miou"] > res.before["miou"] and res.after["pairs"] == len(store.pairs("validation"))
    assert res.model_path == models_dir(store) / "tiny-ft1" and res.name == "tiny-ft1"
    card = read_card(res.model_path)
    assert card.parent == "tiny" and card.training["store_hash"] == store.content_hash()
    assert card.training["steps"] == 60 and card.metrics["after"]["miou"] == res.after["miou"]
    assert [v[0] for v in list_versions(store)] == ["tiny-ft1"]
    assert not list((models_dir(store) / ".runs").glob("*/state"))  # the run's state is gone once exported
    assert (res.model_path / "model.safetensors").is_file() and (res.model_path / "loss.png").is_file()
    assert (res.model_path / "log.csv").read_text().count("\n") == 61  # header + one row per step
    # progress: evaluation phases and every training step, with loss and ETA
    train_msgs = [m for d, t, m in seen if m.startswith("step ")]
    assert len(train_msgs) == 60 and "loss" in train_msgs[-1] and "ETA" in train_msgs[-1]
    # the new version segments like its recorded metrics say, and a second run is ft2 from ft1
    seg = Segmenter.from_pretrained(res.model_path)
    image, labels = store.load(store.pairs("validation")[0].id)
    assert (seg.predict(image).labels == labels).mean() > 0.8
    assert next_version_name(store, "tiny-ft1") == "tiny-ft2"


def test_cancel_keeps_state_and_resume_matches_an_uninterrupted_run(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    cfg = FinetuneConfig(steps=12, **FAST)
    whole = finetune(make_store(tmp_path / "a"), base, cfg)

    store = make_store(tmp_path / "b")
    calls = []
    stopped = finetune(store, base, cfg, on_progress=lambda d, t, m: calls.append(m),
                       cancel=lambda: sum(m.startswith("step ") for m in calls) >= 7)
    assert not stopped.finished and stopped.model_path is None and stopped.after == {}
    assert stopped.steps == 7 and list_versions(store) == []
    resumed = finetune(store, base, cfg)
    assert resumed.finished and resumed.steps == 12
    a, _ = load_checkpoint(whole.model_path)
    b, _ = load_checkpoint(resumed.model_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_killed_run_leaves_no_model_and_resumes(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    store = make_store(tmp_path / "store")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        torch.set_num_threads(1)
        from training.finetune import FinetuneConfig, finetune
        finetune({str(store.root)!r}, {str(base)!r}, FinetuneConfig(steps=400, **{FAST!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    runs = models_dir(store) / ".runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/state")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert list(runs.glob("*/state")), "the run never wrote a checkpoint"
    assert list_versions(store) == [] and not [p for p in models_dir(store).iterdir() if not p.name.startswith(".")]
    # the same call again continues from the last checkpoint, not from step 0
    steps = []
    res = finetune(store, base, FinetuneConfig(steps=400, **FAST),
                   on_progress=lambda d, t, m: steps.append(d) if m.startswith("step ") else None,
                   cancel=lambda: len(steps) >= 3)
    assert min(steps) > 5 and res.steps == max(steps) and res.model_path is None


def test_new_class_is_added_and_learned_old_rows_kept(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    old, _ = load_checkpoint(base)
    store = make_store(tmp_path / "store", n=6, classes=(1, 2))
    store.set_class_names(["ground", "red", "green"])
    res = finetune(store, base, FinetuneConfig(steps=150, **{**FAST, "lr": 1e-2}))
    new, card = load_checkpoint(res.model_path)
    assert card.classes == ["ground", "red", "green"] and card.config["num_classes"] == 3
    assert len(card.palette) == 3
    grown = [k for k in old if old[k].shape != new[k].shape]
    assert grown, "no tensor grew"
    for key in grown:
        assert new[key].shape[0] == 3 and old[key].shape[0] == 2
    seg = Segmenter.from_pretrained(res.model_path)
    ious = []
    for rec in store.pairs():
        image, labels = store.load(rec.id)
        pred = seg.predict(image).labels
        ious.append(((pred == 2) & (labels == 2)).sum() / max(((pred == 2) | (labels == 2)).sum(), 1))
    assert np.mean(ious) > 0.4, ious
    assert res.before["per_class_iou"].get("green", 0.0) == 0.0  # the base cannot predict it
    assert res.after["per_class_iou"]["green"] > 30


def test_extend_classes_keeps_old_rows_and_refuses_dupsampling():
    from engine.models import SegmenterConfig, create_model
    from training.tiny import TINY_SEGMENTER

    config = SegmenterConfig.for_variant("dsrl", 2, **TINY_SEGMENTER)
    state = create_model(config).state_dict()
    grown, new_config = extend_classes(state, config, 5)
    assert new_config.num_classes == 5
    model = create_model(new_config)
    model.load_state_dict(grown)  # complete and shape-correct
    changed = [k for k in state if state[k].shape != grown[k].shape]
    assert changed
    for k in changed:
        torch.testing.assert_close(grown[k][:2], state[k])
    with pytest.raises(FineMaskError, match="DUpsampling"):
        dup = SegmenterConfig.for_variant("dsrl_dup", 2, **TINY_SEGMENTER)
        extend_classes(create_model(dup).state_dict(), dup, 3)


def test_refiner_finetune_writes_a_refiner_version(tmp_path):
    base = make_tiny_refiner(tmp_path / "ref")
    before_bytes = sha(base)
    store = make_store(tmp_path / "store")
    res = finetune(store, base, FinetuneConfig(steps=6, batch_size=2, lr=1e-3, ckpt_every=3, log_every=1))
    assert res.finished and sha(base) == before_bytes
    assert set(res.before) >= {"miou", "mba", "coarse"} and res.after["coarse"] == res.before["coarse"]
    card = read_card(res.model_path)
    assert card.task == "refinement" and card.parent == "tiny-refiner" and res.name == "tiny-refiner-ft1"
    refiner = Refiner.from_pretrained(res.model_path)
    a, _ = load_checkpoint(base)
    b, _ = load_checkpoint(res.model_path)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    image, labels = store.load(store.pairs()[0].id)
    assert refiner.refine_labels(image, labels).shape == labels.shape


def test_bad_requests_are_clear(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2)
    empty = Store.open(tmp_path / "empty")
    with pytest.raises(FineMaskError, match="no training pairs"):
        finetune(empty, base)
    with pytest.raises(FineMaskError, match="no such model"):
        finetune(empty, tmp_path / "nothing-here")
    with pytest.raises(FineMaskError, match="at least 1"):
        finetune(empty, base, FinetuneConfig(steps=0))


def test_a_single_pair_store_fine_tunes_and_scores_on_a_held_back_strip(tmp_path):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    store = Store.open(tmp_path / "one")
    store.add(*scene(0), origin="corrected")
    res = finetune(store, base, FinetuneConfig(steps=3, **FAST))  # a batch of 4 crops from the one pair
    # no validation pairs: both models are scored on the strip held back from the training pair
    assert res.finished and res.before["pairs"] == res.after["pairs"] == 1
    assert res.before["validation"] == res.after["validation"] == "held-back strip"
    assert res.before["miou"] is not None and res.after["miou"] is not None
    assert read_card(res.model_path).metrics["after"]["miou"] == res.after["miou"]
    with pytest.raises(FineMaskError, match="at least 2"):
        finetune(store, base, FinetuneConfig(steps=3, batch_size=1))


def test_unlabelled_pixels_are_ignored_by_default_not_a_new_class(tmp_path):
    """Stores mark unpainted pixels 255 (napari's eraser, the web editor); by default they are
    ignored, so a 2-class model stays a 2-class model."""
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(48, 36))
    store = Store.open(tmp_path / "s")
    image, labels = scene(0)
    labels = labels.astype(np.uint8)
    labels[:10] = 255
    store.add(image, labels, origin="corrected")
    res = finetune(store, base, FinetuneConfig(steps=2, **FAST))
    assert len(read_card(res.model_path).classes) == 2
    grown = finetune(store, base, FinetuneConfig(steps=2, ignore_index=None, name="grown", **FAST))
    assert len(read_card(grown.model_path).classes) == 256  # what happened before the default
