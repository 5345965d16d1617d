"""The FineMask dock widget in a real napari viewer (pytest-qt, Xvfb through pytest-xvfb).

Segment, refine, paint, save, fine-tune and undo with tiny models on a 64x96 scene; a slow fake
job shows the event loop keeps running and Cancel works; failures become notifications.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from napari_dock import JOB_TIMEOUT_MS, not_blank, open_widget, run_job
from napari_scenes import make_scene

pytest.importorskip("napari", reason="the napari plugin tests need the napari extra (pip install finemask[napari])")

from qtpy.QtCore import QTimer

from app.napari import logic
from app.napari.widget import FineMaskWidget
from engine.errors import Cancelled
from engine.segment import Segmenter
from engine.store import Store

ROOT = Path(__file__).resolve().parents[2]
#: Set to write the README screenshot into docs/images (otherwise it stays in tmp).
DOCS_ENV = "FINEMASK_DOCS_SCREENSHOTS"


def test_segment_refine_correct_save_finetune_undo(make_napari_viewer, qtbot, tiny_models, scene, tmp_path):
    seg_path, ref_path = tiny_models
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    assert widget.segmenter_choice.value == "camvid"  # shipped default

    viewer.open_sample("finemask", "outdoor")
    assert viewer.layers["outdoor"].data.shape == (1468, 2199, 3)
    assert "public domain" in viewer.layers["outdoor"].metadata["attribution"]

    image = viewer.add_image(scene, name="scene")
    widget.add_model_folder(seg_path)
    widget.add_model_folder(ref_path)
    assert widget.segmenter_choice.value == str(seg_path) and widget.refiner_choice.value == str(ref_path)
    widget.image_choice.value = image

    # --- segment: labels (class + 1) with names and colours, and the uncertainty map
    run_job(qtbot, widget, widget.segment)
    labels = viewer.layers["scene labels"]
    uncertainty = viewer.layers["scene uncertainty"]
    expected = Segmenter.from_pretrained(seg_path, device="cpu").predict(scene)
    np.testing.assert_array_equal(labels.data, expected.labels + 1)
    np.testing.assert_allclose(uncertainty.data, expected.uncertainty, atol=1e-3)
    assert uncertainty.data.min() >= 0 and uncertainty.data.max() <= 1
    info = labels.metadata["finemask"]
    assert info["classes"] == ["class 0", "class 1", "class 2"] and info["origin"] == "predicted"
    assert list(labels.features["class"]) == ["unlabelled", *info["classes"]]
    for k, rgb in enumerate(info["palette"]):
        np.testing.assert_allclose(labels.get_color(k + 1)[:3], np.array(rgb) / 255, atol=1e-6)

    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert not_blank(shot)
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.shape[1] > canvas.shape[1]  # the docked widget is in the window screenshot

    # --- refine (full): full-size result, a view of what changed
    assert widget.labels_choice.value is labels  # the segmentation is the labels being worked on
    assert tuple(widget.refine_mode.choices) == ("full", "fast", "local")
    widget.refine_mode.value = "full"
    run_job(qtbot, widget, widget.refine)
    refined = viewer.layers["scene labels refined (full)"]
    changes = viewer.layers["scene labels changes"]
    assert refined.data.shape == scene.shape[:2]
    assert set(np.unique(refined.data)) <= set(np.unique(labels.data))
    np.testing.assert_array_equal(changes.data.astype(bool), refined.data != labels.data)
    assert not changes.visible
    widget.show_changes.value = True
    assert changes.visible
    assert widget.labels_choice.value is refined

    # --- correct: paint with napari's own tool; the layer is now "corrected"
    widget.paint_class.value = 3  # class 2
    assert refined.selected_label == 3 and refined.mode == "paint"
    refined.brush_size = 9
    refined.paint((40, 60), 3)
    assert refined.data[40, 60] == 3 and refined.metadata["finemask"]["origin"] == "corrected"

    # --- save: image and labels in the store; the folder is remembered
    store_dir = tmp_path / "store"
    widget.store_dir.value = store_dir
    assert logic.load_settings()["store"] == str(store_dir)
    run_job(qtbot, widget, widget.save)
    store = Store.open(store_dir, create=False)
    (pair,) = store.pairs()
    stored_image, stored_labels = store.load(pair.id)
    np.testing.assert_allclose(stored_image, scene / 255.0, atol=1e-6)
    np.testing.assert_array_equal(stored_labels, refined.data.astype(np.int32) - 1)
    assert pair.origin == "corrected" and store.class_names == info["classes"]
    first_saved = refined.data.copy()

    refined.paint((10, 10), 1)  # a second correction, saved as a new version of the same pair
    run_job(qtbot, widget, widget.save)
    assert len(store) == 1 and store.get(pair.id).history_length == 1

    # --- fine-tune a few steps: the new version becomes the selected segmenter. A second
    # corrected image goes in first: a DSRL batch of one image cannot train (BatchNorm after
    # global pooling needs two samples), and the loop's batch is at most the number of pairs.
    other = make_scene(seed=1)
    store.add(other, np.ones(other.shape[:2], np.uint8), origin="corrected")
    assert len(store.pairs("train")) == 2
    widget.steps.value = 2
    widget.finetune_options = {"batch_size": 2, "crop": (32, 32), "log_every": 1, "ckpt_every": 100}
    run_job(qtbot, widget, widget.finetune)
    result = widget.last_result
    assert result.finished and result.model_path.parent == store_dir / "models"
    assert widget.segmenter_choice.value == str(result.model_path)
    assert result.name in widget.finetune_info.value
    assert widget.loss_history and "loss" in widget.loss_label.value
    assert widget.segmenter_choice.current_choice.startswith(f"{result.name} · fine-tuned")

    # --- undo the second save: the store and the layer go back to the first saved labels
    run_job(qtbot, widget, widget.undo)
    np.testing.assert_array_equal(refined.data, first_saved)
    np.testing.assert_array_equal(store.load(pair.id)[1], first_saved.astype(np.int32) - 1)
    assert store.get(pair.id).history_length == 0

    # --- the manifest's writer and reader: a uint16 class TIFF that opens as the same layer
    written = refined.save(str(tmp_path / "corrected.tif"), plugin="finemask")
    assert written == [str(tmp_path / "corrected.finemask.tif")]
    assert tifffile.imread(written[0]).dtype == np.uint16
    (reopened,) = viewer.open(written[0], plugin="finemask")
    np.testing.assert_array_equal(reopened.data, refined.data)
    assert reopened.metadata["finemask"]["classes"] == info["classes"]

    # --- next session: a new widget opens the remembered store and lists the new version
    listeners = len(viewer.layers.events.inserted.callbacks)
    again = FineMaskWidget(viewer)
    assert again.store is not None and again.store.root == store_dir
    assert str(result.model_path) in [source for _, source in again._model_options("segmentation")]
    assert len(viewer.layers.events.inserted.callbacks) == listeners + 1
    again.deleteLater()
    qtbot.waitUntil(lambda: len(viewer.layers.events.inserted.callbacks) == listeners, timeout=2000)
    viewer.add_labels(np.zeros((4, 4), np.uint8), name="after")  # the deleted widget no longer listens
    assert widget.labels_choice.value is viewer.layers["after"]  # a new layer is the one to work on


def test_screenshot_of_the_outdoor_sample_segmented(make_napari_viewer, qtbot, tmp_path):
    """The shipped camvid model on the outdoor sample, widget docked: the README picture."""
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    viewer.window._qt_window.resize(1500, 1100)
    viewer.open_sample("finemask", "outdoor")
    assert widget.image_choice.value is viewer.layers["outdoor"]  # chosen without asking
    run_job(qtbot, widget, widget.segment)
    labels = viewer.layers["outdoor labels"]
    assert labels.data.shape == (1468, 2199)
    assert labels.metadata["finemask"]["classes"][0] == "Sky"
    viewer.layers["outdoor uncertainty"].visible = False
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert not_blank(shot)
    from PIL import Image

    path = tmp_path / "napari_segment.png"
    Image.fromarray(shot).save(path)
    if os.environ.get(DOCS_ENV):
        shutil.copy(path, ROOT / "docs" / "images" / "napari_segment.png")


class _SlowSegmenter:
    """A segmenter that works until released or cancelled, reporting progress as it goes."""

    def __init__(self):
        self.classes = ["a", "b"]
        self.palette = [[0, 0, 0], [255, 255, 255]]
        self.card = SimpleNamespace(name="slow")
        self.release = threading.Event()
        self.started = threading.Event()

    def predict_batch(self, images, working_size=None, on_progress=None, cancel=None):
        self.started.set()
        on_progress(1, 4, "working")
        deadline = time.monotonic() + 20
        while not self.release.is_set() and time.monotonic() < deadline:
            if cancel():
                raise Cancelled("cancelled")
            time.sleep(0.01)
        raise AssertionError("the test never releases this job")


def test_event_loop_runs_during_a_long_job_and_cancel_stops_it(make_napari_viewer, qtbot, scene, notifications):
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    widget.image_choice.value = viewer.add_image(scene, name="scene")
    slow = _SlowSegmenter()
    widget.models.segmenter = lambda source: slow
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(10)
    try:
        widget.segment()
        assert widget.busy and not widget.segment_button.enabled
        qtbot.waitUntil(lambda: len(ticks) >= 20, timeout=10_000)  # UI timers fire while the job runs
        assert widget.busy and slow.started.is_set()
        qtbot.waitUntil(lambda: widget.job_message.value == "working", timeout=5_000)
        assert (widget.progress_bar.value, widget.progress_bar.max) == (1, 4)
        widget.cancel()
        qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    finally:
        timer.stop()
    assert isinstance(widget.last_error, Cancelled)
    assert any("segmentation cancelled" in n.message for n in notifications)
    assert [layer.name for layer in viewer.layers] == ["scene"]  # nothing added
    assert widget.segment_button.enabled


def test_failures_are_notified_with_their_cause(make_napari_viewer, qtbot, scene, notifications, tmp_path,
                                                monkeypatch):
    import engine.checkpoints

    shipped = tmp_path / "shipped"  # an install whose default refiner is missing
    shipped.mkdir()
    monkeypatch.setattr(engine.checkpoints, "ASSETS_MODELS", shipped)
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    widget.segment()  # no image layer yet
    assert any("choose an Image layer" in n.message for n in notifications)

    widget.image_choice.value = viewer.add_image(scene, name="scene")
    drawn = viewer.add_labels(np.zeros(scene.shape[:2], np.uint8), name="drawn")
    widget.labels_choice.value = drawn
    widget.refiner_choice.value = logic.DEFAULT_REFINER
    widget.refine()
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    assert any("refine-light" in n.message and "not installed" in n.message for n in notifications)

    assert widget.labels_choice.value is drawn
    widget.save()  # no store folder chosen
    assert any("choose a store folder" in n.message for n in notifications)
    (tmp_path / "file").write_text("x")
    widget.store_dir.value = tmp_path / "file"  # a file is not a store
    assert widget.store is None and any("must be a folder" in n.message for n in notifications)


def test_4k_image_gives_full_resolution_labels_and_painting_stays_fast(make_napari_viewer, qtbot, tiny_models):
    """3840x2160: segmentation and refinement come back at full size; a brush stroke is quick."""
    seg_path, ref_path = tiny_models
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    small = make_scene(54, 96)
    big = np.repeat(np.repeat(small, 40, axis=0), 40, axis=1)  # 2160 x 3840
    widget.image_choice.value = viewer.add_image(big, name="big")
    widget.add_model_folder(seg_path)
    widget.add_model_folder(ref_path)
    run_job(qtbot, widget, widget.segment)
    labels = viewer.layers["big labels"]
    assert labels.data.shape == (2160, 3840) and labels.data.dtype == np.uint8
    widget.refine_mode.value = "fast"
    run_job(qtbot, widget, widget.refine)
    refined = viewer.layers["big labels refined (fast)"]
    assert refined.data.shape == (2160, 3840)

    refined.brush_size = 40
    qtbot.wait(50)
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        refined.paint((200 + 150 * i, 300 + 300 * i), 2)
        qtbot.wait(1)  # let the canvas redraw
        times.append(time.perf_counter() - t0)
    assert refined.data[200, 300] == 2 and refined.metadata["finemask"]["origin"] == "corrected"
    assert np.median(times) < 0.25, times  # a stroke updates only its region, not the 8-megapixel layer
