"""The memory guard: jobs shrink their batch to fit free memory, or refuse with the figures."""
from __future__ import annotations

import numpy as np
import pytest

from app.cli import main
from engine import memory_guard
from engine.errors import FineMaskError
from engine.io import write_image, write_labels
from engine.memory_guard import MemoryBudgetError, memory_limit, plan_batch
from engine.refine import Refiner
from engine.segment import Segmenter
from training.tiny import make_tiny_refiner, make_tiny_segmenter

MB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "seg", num_classes=3, input_size=(64, 48)), make_tiny_refiner(root / "ref")


def _scene(h=200, w=300, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((h, w, 3), dtype=np.float32) * 0.2
    mask = np.zeros((h, w), bool)
    mask[50:150, 80:220] = True
    image[mask] += 0.7
    return image, mask


@pytest.mark.parametrize("raw, expected", [("2G", 2 << 30), ("512m", 512 * MB), ("1000", 1000), ("1.5K", 1536),
                                           ("64MB", 64 * MB), ("", None)])
def test_memory_limit_parses_sizes(monkeypatch, raw, expected):
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", raw)
    assert memory_limit() == expected


def test_memory_limit_rejects_nonsense(monkeypatch):
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "lots")
    with pytest.raises(FineMaskError, match="FINEMASK_MEMORY_LIMIT"):
        memory_limit()


def test_plan_batch_lowers_then_refuses(monkeypatch):
    monkeypatch.setattr(memory_guard.tiling, "available_memory", lambda device="cpu": 1000 * MB)
    # 800 MiB usable: 300 fixed leaves 500 for 100 MiB items.
    assert plan_batch(fixed_bytes=300 * MB, item_bytes=100 * MB, wanted=16, device="cpu", what="x") == 5
    assert plan_batch(fixed_bytes=300 * MB, item_bytes=100 * MB, wanted=2, device="cpu", what="x") == 2
    with pytest.raises(MemoryBudgetError, match=r"0.59 GiB of memory for one image but only 0.49 GiB"):
        plan_batch(fixed_bytes=300 * MB, item_bytes=600 * MB, wanted=1, device="cpu", what="segmenting")
    with pytest.raises(MemoryBudgetError, match=r"x needs about 0.88 GiB of memory but only 0.78 GiB can be used"):
        plan_batch(fixed_bytes=900 * MB, item_bytes=1, wanted=1, device="cpu", what="x")


def test_env_limit_caps_free_memory(monkeypatch):
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "10M")
    assert memory_guard.free_bytes("cpu") == 10 * MB


def test_refiner_lowers_tile_batch_with_same_result(tiny, monkeypatch):
    refiner = Refiner.from_pretrained(tiny[1], device="cpu", max_batch=8, precision="float32")
    image, mask = _scene(300, 400)
    L = 128
    free = refiner.tile_bytes(L, L) * 2.5 + 6 * 300 * 400  # two tiles fit next to the result buffers
    monkeypatch.setattr(memory_guard, "free_bytes", lambda device="cpu": int(free / memory_guard.FRACTION))
    guarded = refiner.refine(image, mask, L=L, selection="all", batch_size=8)
    assert refiner.stats.batch_size == 2
    monkeypatch.undo()
    direct = refiner.refine(image, mask, L=L, selection="all", batch_size=2)
    np.testing.assert_array_equal(guarded, direct)


def test_refiner_refuses_before_any_work(tiny, monkeypatch):
    refiner = Refiner.from_pretrained(tiny[1], device="cpu")
    image, mask = _scene()
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "100K")
    calls = []
    with pytest.raises(MemoryBudgetError, match=r"refining a 300x200 image needs about .* MiB"):
        refiner.refine(image, mask, L=128, on_progress=lambda *a: calls.append(a))
    assert calls == []
    labels = mask.astype(np.uint8) + (np.arange(300)[None] > 250)
    with pytest.raises(MemoryBudgetError, match="refining a 300x200 label map"):
        refiner.refine_labels(image, labels.astype(np.uint8), L=128)


def test_segmenter_splits_batches_with_same_result(tiny, monkeypatch):
    seg = Segmenter.from_pretrained(tiny[0], device="cpu")
    images = [_scene(120, 160, seed=i)[0] for i in range(3)]
    whole = seg.predict_batch(images)
    working = whole[0].working_size
    fixed_one = seg.batch_that_fits(working, [(120, 160)])  # probe once, unguarded
    assert fixed_one == 1
    item = int(seg._bytes_per_pixel() * working[0] * working[1]) + 12 * working[0] * working[1] \
        + 32 * 3 * working[0] * working[1]
    fixed = 3 * (120 * 160 * 31 + 8 * 3 * 256 * 160)
    monkeypatch.setattr(memory_guard, "free_bytes",
                        lambda device="cpu": int((fixed + 1.5 * item) / memory_guard.FRACTION))
    assert seg.batch_that_fits(working, [(120, 160)] * 3) == 1
    split = seg.predict_batch(images)
    for a, b in zip(whole, split):
        assert (a.labels != b.labels).mean() < 1e-3
        np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), atol=2e-3)


def test_cli_refuses_with_message_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    image, mask = _scene()
    write_image(tmp_path / "img.png", (image * 255).astype(np.uint8))
    write_labels(tmp_path / "mask.png", mask.astype(np.uint8) * 255)
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "200K")
    out = tmp_path / "out.png"
    code = main(["refine", str(tmp_path / "img.png"), str(tmp_path / "mask.png"), "-o", str(out),
                 "--model", str(tiny[1]), "--L", "128"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "needs about" in err and "Traceback" not in err
    code = main(["segment", str(tmp_path / "img.png"), "-o", str(out), "--model", str(tiny[0])])
    assert code == 2 and not out.exists()
    assert "segmenting a 300x200 image" in capsys.readouterr().err
