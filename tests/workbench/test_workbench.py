"""app.workbench: the jobs behind napari and the web app, the model catalog and its cache.

Tiny random models on small synthetic images: every test runs in seconds on one CPU core.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from app import workbench
from app.workbench import ModelCache, ModelCatalog, percent_metrics
from engine.checkpoints import ASSETS_MODELS, read_card, record_metrics
from engine.errors import Cancelled, FineMaskError
from engine.pipeline import segment_image
from engine.refine import Refiner
from engine.segment import Segmenter
from engine.store import UNLABELLED, Store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(segmenter folder, refiner folder): tiny random models, 3 classes named class 0..2."""
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "tiny", num_classes=3), make_tiny_refiner(root / "tiny-ref")


@pytest.fixture(scope="module")
def models(tiny):
    return Segmenter.from_pretrained(tiny[0], device="cpu"), Refiner.from_pretrained(tiny[1], device="cpu")


def scene(h: int = 48, w: int = 72, seed: int = 0) -> np.ndarray:
    """uint8 RGB: two halves of different colour, a red square, noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    img[:, : w // 2] = (0.2, 0.3, 0.8)
    img[:, w // 2:] = (0.8, 0.7, 0.2)
    img[h // 4: h // 2, w // 5: w // 5 + h // 4] = (0.9, 0.1, 0.1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def halves(h: int = 48, w: int = 72) -> np.ndarray:
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2:] = 1
    return labels


class RecordingRefiner:
    """Stands in for engine.refine.Refiner: records each call's labels, probs and options."""

    def __init__(self):
        self.calls: list[dict] = []

    def refine_labels(self, image, labels, probs=None, **options):
        self.calls.append({"labels": labels.copy(), "probs": probs, **options})
        out = labels.copy()
        out[0, 0] = 2
        if options.get("return_confidence"):
            return out, np.full(labels.shape, 0.75, np.float32)
        return out


# ------------------------------------------------------------------ open, segment, refine, edit


def test_open_image_keeps_the_bit_depth_and_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "deep.tif", scene().astype(np.uint16) * 256)
    opened = workbench.open_image(tmp_path / "deep.tif")
    assert opened.image.dtype == np.uint16 and opened.image.shape == (48, 72, 3) and opened.name == "deep"
    assert any("16-bit" in note for note in opened.notes)
    Image.fromarray(scene()).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(workbench.open_image(tmp_path / "flat.png").image, scene())
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(FineMaskError, match=r"my upload\.png: "):
        workbench.open_image(tmp_path / "notes.png", name="my upload.png")
    with pytest.raises(Cancelled):
        workbench.open_image(tmp_path / "flat.png", cancel=lambda: True)


def test_segment_is_the_engine_pipeline(models):
    segmenter, _ = models
    image = scene()
    seen = []
    seg = workbench.segment(segmenter, image, 64, on_progress=lambda d, t, m: seen.append((d, t, m)))
    direct = segment_image(segmenter, image, working_size=64).segmentation
    np.testing.assert_array_equal(seg.labels, direct.labels)
    np.testing.assert_allclose(seg.uncertainty, direct.uncertainty)
    assert seg.probs is not None and seg.probs.shape == (3, 48, 72)
    assert seg.classes == ["class 0", "class 1", "class 2"] and len(seg.palette) == 3
    assert max(seg.working_size) == 64 and seen[-1][:2] == (1, 1)
    np.testing.assert_array_equal(workbench.segment(segmenter, image, 0).labels,
                                  segmenter.predict(image).labels)  # 0: the model's own working size
    with pytest.raises(FineMaskError, match=r"working size must lie in 32\.\.4096 pixels, got 5000"):
        workbench.segment(segmenter, image, 5000)


def test_segment_drops_probabilities_too_large_to_keep(models, monkeypatch):
    monkeypatch.setattr(workbench.jobs, "KEEP_PROBS_BYTES", 100)
    seg = workbench.segment(models[0], scene(), 64)
    assert seg.probs is None and seg.uncertainty.shape == (48, 72)


def test_refine_modes_choose_the_steps_and_probs_are_used_only_when_they_fit():
    image, labels = scene(), halves()
    labels[:4, :4] = 2
    fake = RecordingRefiner()
    for mode in ("full", "fast", "local"):
        workbench.refine(fake, image, labels, mode=mode)
    assert [(c["fast"], c["skip_global"]) for c in fake.calls] == [(False, False), (True, False), (False, True)]
    with pytest.raises(FineMaskError, match="refinement mode must be one of full, fast, local"):
        workbench.refine(fake, image, labels, mode="quick")

    probs = np.full((3, 48, 72), 1 / 3, np.float16)
    result = workbench.refine(fake, image, labels, probs, uncertainty=True)
    assert fake.calls[-1]["probs"] is probs
    assert result.labels[0, 0] == 2 and result.changed.sum() == int(labels[0, 0] != 2)
    np.testing.assert_allclose(result.uncertainty, 0.25)
    unlabelled = labels.copy()
    unlabelled[10:12, 10:12] = UNLABELLED  # not a class of probs: they do not fit
    workbench.refine(fake, image, unlabelled, probs)
    assert fake.calls[-1]["probs"] is None
    with pytest.raises(FineMaskError, match="choose the image they belong to"):
        workbench.refine(fake, scene(20, 20), labels)


def test_refine_with_a_tiny_refiner_in_each_mode(models):
    _, refiner = models
    image, labels = scene(), halves()
    for mode in ("full", "fast", "local"):
        result = workbench.refine(refiner, image, labels, mode=mode, uncertainty=True)
        assert result.labels.shape == labels.shape and result.labels.dtype == labels.dtype
        assert set(np.unique(result.labels)) <= {0, 1}
        assert result.uncertainty.shape == labels.shape and 0 <= result.uncertainty.min() <= 0.5
        np.testing.assert_array_equal(result.changed, result.labels != labels)


def test_apply_edit_paints_full_size_strokes_and_upsamples_preview_ones():
    labels = halves()
    strokes = np.full(labels.shape, -1, np.int32)
    strokes[5:10, 5:20] = 2
    result = workbench.apply_edit(labels, strokes)
    assert (result.labels[5:10, 5:20] == 2).all() and result.changed == 75
    np.testing.assert_array_equal(np.delete(result.labels.ravel(), np.flatnonzero(strokes.ravel() >= 0)),
                                  np.delete(labels.ravel(), np.flatnonzero(strokes.ravel() >= 0)))
    preview = np.full((24, 36), -1, np.int32)  # half size: each stroke pixel covers 2x2 labels
    preview[2:4, 3:6] = 2
    edited = workbench.apply_edit(labels, preview)
    assert (edited.labels[4:8, 6:12] == 2).all() and edited.changed == 24 and not edited.snapped
    with pytest.raises(Cancelled):
        workbench.apply_edit(labels, strokes, cancel=lambda: True)


# ------------------------------------------------------------------ store: save, classes, undo


def test_save_then_update_then_undo(tmp_path):
    store = Store.open(tmp_path / "store")
    path = tmp_path / "photo.png"
    Image.fromarray(scene()).save(path)
    first = halves()
    first[:5] = UNLABELLED
    saved = workbench.save_to_store(store, scene(), first, ["a", "b", "c"], image_file=path, origin="predicted")
    assert saved.created and saved.pair_id == "photo" and saved.versions == 0
    assert store.class_names == ["a", "b", "c"] and store.get("photo").image_path.suffix == ".png"
    second = first.copy()
    second[20:30] = 2
    again = workbench.save_to_store(store, scene(), second, ["a", "b", "c"], image_file=path)  # same file
    assert not again.created and again.pair_id == "photo" and again.versions == 1 and len(store) == 1
    np.testing.assert_array_equal(store.load("photo")[1], second)

    undone = workbench.undo_last_save(store, "photo")
    np.testing.assert_array_equal(undone.labels, first)
    np.testing.assert_array_equal(store.load("photo")[1], first)
    assert undone.record.origin == "predicted" and undone.record.history_length == 0
    with pytest.raises(FineMaskError, match="no earlier labels version"):
        workbench.undo_last_save(store, "photo")
    with pytest.raises(FineMaskError, match="nothing from this image was saved"):
        workbench.undo_last_save(store, None)
    with pytest.raises(Cancelled):
        workbench.save_to_store(store, scene(), second, ["a", "b", "c"], pair_id="photo", cancel=lambda: True)
    assert store.get("photo").history_length == 0  # a cancelled save wrote nothing


def test_a_store_named_by_other_classes_is_refused_with_one_message_by_both_front_ends(tmp_path, tiny):
    """The CamVid-store case: labels of another model's classes never go in silently."""
    from app.napari import logic
    from app.web.session import WebConfig
    from app.web.session import Workbench as WebWorkbench

    store = Store.open(tmp_path / "store")
    store.set_class_names(["Sky", "Building", "Road"])  # another model's classes
    before = json.loads(store.manifest_path.read_text())
    image = scene()
    Image.fromarray(image).save(tmp_path / "fundus.png")

    with pytest.raises(FineMaskError) as direct:
        workbench.save_to_store(store, image, halves(), ["class 0", "class 1", "class 2"])
    with pytest.raises(FineMaskError) as napari_error:
        logic.save_pair(store, image, logic.classes_to_layer(halves()), ["class 0", "class 1", "class 2"])
    web = WebWorkbench(WebConfig(store=store.root, examples=[]), model=tiny[0], refiner=tiny[1])
    try:
        work = web.open_image(tmp_path / "fundus.png")
        web.segment(work, "tiny", 64)
        with pytest.raises(FineMaskError) as web_error:
            web.save(work)
    finally:
        web.close()
    assert str(napari_error.value) == str(web_error.value) == str(direct.value)
    assert "this store's classes are Sky, Building, Road; the labels use class 0, class 1, class 2" in \
        str(web_error.value)
    assert json.loads(store.manifest_path.read_text()) == before and len(store) == 0

    # names that start the same list are one vocabulary: a store may name classes a model lacks
    store.set_class_names(["class 0", "class 1", "class 2", "class 3"])
    assert workbench.save_to_store(store, image, halves(), ["class 0", "class 1", "class 2"]).created


def test_web_undo_restores_the_labels_and_the_store(tmp_path, tiny):
    from app.web.session import WebConfig
    from app.web.session import Workbench as WebWorkbench

    Image.fromarray(scene()).save(tmp_path / "photo.png")
    web = WebWorkbench(WebConfig(store=tmp_path / "store", examples=[]), model=tiny[0], refiner=tiny[1])
    try:
        work = web.open_image(tmp_path / "photo.png")
        with pytest.raises(FineMaskError, match="nothing from this image was saved"):
            web.undo(work)
        web.segment(work, "tiny", 64)
        web.save(work)
        segmented = work.labels.copy()
        layer = np.zeros((48, 72, 4), np.uint8)
        layer[5:15, 10:30] = (*web.brush_colours(work)[2], 255)
        web.apply_edit(work, [layer])
        assert (work.labels[5:15, 10:30] == 2).all()
        record = web.save(work)
        assert record.history_length == 1
        restored = web.undo(work)
        np.testing.assert_array_equal(work.labels, segmented)
        np.testing.assert_array_equal(web.store.load(work.pair_id)[1], segmented)
        assert restored.origin == "predicted" and work.origin == "predicted" and work.labels.dtype == np.uint8
    finally:
        web.close()


# ------------------------------------------------------------------ fine-tune


def test_finetune_two_steps_lists_the_version_and_cancel_raises_cancelled(tmp_path, tiny):
    store = Store.open(tmp_path / "store")
    for seed in range(6):
        labels = halves()
        labels[seed * 4: seed * 4 + 8, 10:20] = 2
        store.add(scene(seed=seed), labels, "corrected", name=f"p{seed}")
    store.set_class_names(["class 0", "class 1", "class 2"])
    assert store.pairs("train") and store.pairs("validation")
    from training.finetune import FinetuneConfig

    config = FinetuneConfig(batch_size=2, crop=(32, 32), log_every=1, ckpt_every=100)
    steps = []
    with pytest.raises(Cancelled) as stopped:
        workbench.finetune(store, tiny[0], config, steps=50, on_progress=lambda d, t, m: steps.append(m),
                           cancel=lambda: sum(m.startswith("step ") for m in steps) >= 1)
    assert isinstance(stopped.value, workbench.FinetuneCancelled) and 1 <= stopped.value.steps < 50
    assert not (store.root / "models" / "tiny-ft1").exists()

    result = workbench.finetune(store, tiny[0], config, steps=2)
    assert result.finished and result.steps == 2 and result.model_path == store.root / "models" / "tiny-ft1"
    entry = ModelCatalog(store.root).entry("tiny-ft1", "segmentation")
    assert entry.origin == "store" and entry.source == str(result.model_path)
    assert f"mIoU {result.before['miou']:.1f} → {result.after['miou']:.1f}" in entry.label
    with pytest.raises(FineMaskError, match="step budget must be at least 1"):
        workbench.finetune(store, tiny[0], config, steps=0)


# ------------------------------------------------------------------ catalog, metrics, cache


def test_metrics_of_cards_are_read_in_percent():
    stored = {
        "camvid_val": {"miou": 0.578, "per_class_iou": {"Sky": 0.93, "Pole": 0.04}, "pixel_accuracy": 0.9,
                       "images": 1},
        "idrid_val_refine": {"summary": [{"class": "a", "iou_before": 0.5, "mba_after": 0.75, "images": 10}]},
        "before": {"miou": 0.5, "mba": 40.0, "pairs": 1},  # fine-tuning: percent by contract, even below 1
        "after": {"miou": 0.75, "pairs": 1},
        "old_percent": {"miou": 57.8},
        "sr_x2": {"Set5": {"psnr": 30.1, "ssim": 0.9}},
    }
    got = percent_metrics(stored)
    assert got["camvid_val"]["miou"] == pytest.approx(57.8)
    assert got["camvid_val"]["per_class_iou"] == pytest.approx({"Sky": 93.0, "Pole": 4.0})
    assert got["camvid_val"]["pixel_accuracy"] == pytest.approx(90.0) and got["camvid_val"]["images"] == 1
    assert got["idrid_val_refine"]["summary"] == [{"class": "a", "iou_before": 50.0, "mba_after": 75.0, "images": 10}]
    assert got["before"] == stored["before"] and got["after"] == stored["after"]
    assert got["old_percent"]["miou"] == pytest.approx(57.8)
    assert got["sr_x2"]["Set5"]["ssim"] == 0.9  # not a rate of the scale
    assert percent_metrics(got) == got  # reading twice changes nothing
    assert stored["camvid_val"]["miou"] == 0.578  # the input is left alone

    shipped = ModelCatalog().entry("camvid", "segmentation")
    fraction = read_card("camvid").metrics["camvid_val"]["miou"]
    assert shipped.card.metrics["camvid_val"]["miou"] == pytest.approx(100 * fraction)
    assert f"mIoU {100 * fraction:.1f}" in shipped.label
    assert f"mIoU {100 * fraction:.1f}" in workbench.metrics_details(read_card("camvid"))


def test_catalog_lists_each_folder_once_and_offers_a_missing_default(tmp_path, tiny):
    catalog = ModelCatalog(tmp_path / "no-store", [tiny[0], tiny[1], str(tiny[0])])
    segs = catalog.entries("segmentation", default="camvid")
    assert [e.key for e in segs if e.origin == "folder"] == ["tiny"]
    assert segs[0].key == "camvid" and segs[0].origin == "shipped"
    refs = catalog.entries("refinement", default="no-such-refiner")
    assert refs[0].key == "no-such-refiner" and not refs[0].available and "(not installed)" in refs[0].label
    assert catalog.find(str(tiny[1]), "refinement").key == "tiny-refiner"
    with pytest.raises(FineMaskError, match="unknown segmentation model 'nope'.*available: .*tiny"):
        catalog.entry("nope", "segmentation")
    with pytest.raises(FineMaskError, match="unknown"):
        catalog.entry(str(tiny[0]), "segmentation")  # a key, never a path
    with pytest.raises(FineMaskError, match="not installed"):
        catalog.load(refs[0])


def test_cache_keeps_a_model_and_reloads_it_when_its_folder_changes(tmp_path, tiny):
    folder = Path(shutil.copytree(tiny[0], tmp_path / "seg"))
    cache = ModelCache(capacity=2)
    first = cache.segmenter(folder)
    assert cache.segmenter(folder) is first and cache.segmenter(str(folder) + "/") is first
    assert cache.loads == {f"segmenter:{folder}": 1}
    card = folder / "card.json"
    stat = card.stat()
    os.utime(card, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rewritten card, say
    second = cache.segmenter(folder)
    assert second is not first and cache.segmenter(folder) is second
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.segmenter(folder) is not second
    cache.refiner(tiny[1])
    cache.segmenter("camvid")
    assert len(cache) == 2  # capacity: the least recently used model went
    missing = tmp_path / "shipped"
    missing.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        import engine.checkpoints

        mp.setattr(engine.checkpoints, "ASSETS_MODELS", missing)
        with pytest.raises(FineMaskError, match="default refinement model 'refine-light' is not installed"):
            ModelCache().refiner("refine-light")


def test_record_metrics_refuses_shipped_models(tmp_path):
    card_before = (ASSETS_MODELS / "camvid" / "card.json").read_bytes()
    with pytest.raises(FineMaskError, match="shipped with FineMask.*never written"):
        record_metrics("camvid", "my_test", {"miou": 0.5})
    assert (ASSETS_MODELS / "camvid" / "card.json").read_bytes() == card_before
    copy = Path(shutil.copytree(ASSETS_MODELS / "idrid", tmp_path / "idrid-copy"))
    record_metrics(copy, "my_test", {"miou": 0.5})
    assert read_card(copy).metrics["my_test"] == {"miou": 0.5}


def test_pipeline_refines_with_the_segmentations_probabilities(models):
    segmenter, _ = models
    fake = RecordingRefiner()
    result = segment_image(segmenter, scene(), working_size=64, refiner=fake, mode="local")
    call = fake.calls[0]
    assert call["skip_global"] and not call["fast"] and call["probs"] is result.segmentation.probs
    assert result.refined and result.labels[0, 0] == 2 and set(result.seconds) == {"segment", "refine"}
    np.testing.assert_array_equal(result.segmentation.labels, segmenter.predict(scene(), 64).labels)
    with pytest.raises(Cancelled):
        segment_image(segmenter, scene(), refiner=fake, cancel=lambda: True)
