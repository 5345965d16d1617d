"""A new user's first hour in napari (issue 35): each test drives the real dock in a real viewer.

Reader dialogs on plain photos, the Image picker, the job line, the one Labels picker, saving over
another image's labels, the writer napari picks, fine-tuning status, the dock's details and
closing the viewer during a job.
"""
from __future__ import annotations

import json
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from napari_dock import answer_questions, open_widget, run_job
from napari_scenes import make_scene
from PIL import Image

pytest.importorskip("napari", reason="the napari plugin tests need the napari extra (pip install finemask[napari])")

from qtpy.QtCore import QPoint, QThreadPool

from app.napari import logic
from engine.errors import Cancelled
from engine.io import read_label_info
from engine.store import Store


@pytest.fixture(scope="module")
def named_models(tmp_path_factory, tiny_models):
    """A tiny segmenter whose first class is a background (as idrid's), and the tiny refiner."""
    from training.tiny import make_tiny_segmenter

    folder = make_tiny_segmenter(tmp_path_factory.mktemp("named") / "lesions", num_classes=3)
    card = json.loads((folder / "card.json").read_text())
    card["classes"] = ["background", "lesion", "disc"]
    (folder / "card.json").write_text(json.dumps(card))
    return folder, tiny_models[1]


# ------------------------------------------------------------------ 1. the reader


def test_plain_images_open_with_napari_and_no_reader_dialog(make_napari_viewer, tmp_path, scene):
    from napari.plugins import _npe2
    from napari.settings import get_settings

    viewer = make_napari_viewer()
    photo, png, tif = tmp_path / "photo.jpg", tmp_path / "photo.png", tmp_path / "scan.tif"
    Image.fromarray(scene).save(photo)
    Image.fromarray(scene).save(png)
    tifffile.imwrite(tif, scene)
    for path in (photo, png, tif):
        # napari shows its reader dialog exactly when two readers match a name
        assert set(_npe2.get_readers(str(path))) == {"napari"}, path
        (layer,) = viewer.open(str(path))  # what File > Open and drag-and-drop call first
        assert layer.data.shape[:2] == scene.shape[:2]
    assert "finemask" in _npe2.get_readers(str(tmp_path / "mask.finemask.tif"))

    # Someone ticked "remember this choice" for .jpg in the old dialog: every later .jpg still
    # opens (napari sets aside a remembered reader that does not claim the name), no "refused the file".
    settings = get_settings().plugins
    before = dict(settings.extension2reader)
    settings.extension2reader = {**before, "*.jpg": "finemask"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # napari's note about the set-aside choice
            (layer,) = viewer.open(str(photo))
    finally:
        settings.extension2reader = before
    with Image.open(photo) as decoded:
        np.testing.assert_array_equal(layer.data, np.asarray(decoded))  # the photo, as decoded


# ------------------------------------------------------------------ 2. the Image picker


def test_image_picker_takes_the_newest_image_and_keeps_choices_on_rename(make_napari_viewer, qtbot, scene,
                                                                         tiny_models):
    viewer = make_napari_viewer()
    first = viewer.add_image(scene, name="first")
    widget = open_widget(viewer)
    assert widget.image_choice.value is first  # opened before the dock
    widget.add_model_folder(tiny_models[0])
    run_job(qtbot, widget, widget.segment)  # the first Segment works without touching the picker
    labels = viewer.layers["first labels"]
    assert widget.image_choice.value is first  # the uncertainty map is never offered
    assert [x.name for x in widget.image_choice.choices if x is not None] == ["first"]

    viewer.open_sample("finemask", "outdoor")  # sample data, after the dock
    assert widget.image_choice.value is viewer.layers["outdoor"]
    assert widget.labels_choice.value is labels  # another image does not change the labels

    widget.image_choice.value = first  # the user's choice ...
    labels.name = "mine"
    viewer.layers["outdoor"].name = "mountains"
    first.name = "one"
    assert widget.image_choice.value is first and widget.labels_choice.value is labels  # ... survives renames
    drawn = viewer.add_labels(np.zeros(scene.shape[:2], np.uint8), name="drawn")
    assert widget.image_choice.value is first and widget.labels_choice.value is drawn


# ------------------------------------------------------------------ 3. the job line


def test_job_line_stays_in_sight_and_segmentation_reports_its_steps(make_napari_viewer, qtbot, tiny_models):
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    window = widget.window()
    window.resize(1400, 1020)
    qtbot.wait(100)
    big = np.repeat(np.repeat(make_scene(), 10, axis=0), 10, axis=1)  # 640x960: three row strips
    widget.image_choice.value = viewer.add_image(big, name="big")
    widget.add_model_folder(tiny_models[0])
    seen = []
    widget._relay.progressed.connect(lambda done, total, message: seen.append((done, total, message)))
    widget.segment()
    for control in (widget.cancel_button.native, widget.progress_bar.native, widget.job_message.native):
        assert not control.visibleRegion().isEmpty()  # not scrolled away ...
        corner = control.mapTo(window, QPoint(control.width(), control.height()))
        assert 0 < corner.y() <= window.height() and 0 < corner.x() <= window.width()  # ... nor off-window
    assert widget.cancel_button.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.last_error is None
    messages = [m for _, _, m in seen]
    assert any(m.startswith("loading the segmenter") for m in messages)
    assert any(m.startswith("running the model at") for m in messages)
    rows = [(d, t) for d, t, m in seen if m.startswith("upsampling to 960x640: rows")]
    assert [m for m in messages if "upsampling" in m][-1].endswith("rows 640/640")
    assert len(rows) == 3 and rows[0][0] < rows[-1][0] <= rows[-1][1] == 4  # the network + 3 strips
    assert widget.progress_bar.value == widget.progress_bar.max and "done" in widget.job_message.value


# ------------------------------------------------------------------ 4. one Labels picker


def test_refine_starts_from_the_segmentation_and_modes_do_not_stack(make_napari_viewer, qtbot, scene,
                                                                   tiny_models):
    from engine.refine import Refiner

    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    widget.image_choice.value = viewer.add_image(scene, name="scene")
    widget.add_model_folder(tiny_models[0])
    widget.add_model_folder(tiny_models[1])
    run_job(qtbot, widget, widget.segment)
    seg = viewer.layers["scene labels"]
    probs = seg.metadata["finemask"]["probs"]
    widget.refine_mode.value = "fast"
    run_job(qtbot, widget, widget.refine)
    fast = viewer.layers["scene labels refined (fast)"]
    assert widget.labels_choice.value is fast  # the labels being worked on: the result
    assert "Refines: scene labels" in widget.refine_source.value  # ... but Refine starts from the segmentation

    widget.refine_mode.value = "full"
    run_job(qtbot, widget, widget.refine)
    full = viewer.layers["scene labels refined (full)"]
    refiner = Refiner.from_pretrained(tiny_models[1], device="cpu")
    expected = logic.refine(refiner, scene, seg.data, probs, mode="full").values
    np.testing.assert_array_equal(full.data, expected)  # refined from the segmentation, not from "fast"
    assert full.metadata["finemask"]["refined_from"] == seg.unique_id

    count = len(viewer.layers)
    widget.refine_mode.value = "fast"
    run_job(qtbot, widget, widget.refine)  # the same mode again: its layer is updated, nothing stacks
    assert len(viewer.layers) == count and widget.labels_choice.value is fast

    fast.paint((5, 5), 1)  # painted: now the user's own labels, refined as they are
    widget.labels_choice.value = seg
    widget.labels_choice.value = fast
    assert widget.refine_source.value == "Refines: scene labels refined (fast)"


# ------------------------------------------------------------------ 5. saving over another image's labels


def test_unnamed_labels_are_refused_and_replacing_a_pair_asks_first(make_napari_viewer, qtbot, scene, tmp_path,
                                                                    tiny_models, notifications):
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    widget.image_choice.value = image = viewer.add_image(scene, name="frame")
    widget.add_model_folder(tiny_models[0])
    widget.store_dir.value = tmp_path / "store"
    run_job(qtbot, widget, widget.segment)
    run_job(qtbot, widget, widget.save)  # the frame's own segmentation: a new pair, no question
    store = Store.open(tmp_path / "store", create=False)
    (pair,) = store.pairs()
    stored = store.load(pair.id)[1].copy()

    drawn = viewer.add_labels(np.zeros(scene.shape[:2], np.int64), name="drawn")
    drawn.data[:20] = 1  # a hand-drawn 0/1 mask: no class names
    assert widget.labels_choice.value is drawn
    widget.image_choice.value = image
    widget.save()
    assert not widget.busy and any("has no class names" in n.message for n in notifications)
    assert store.get(pair.id).history_length == 0  # refused: the pair is untouched

    assert widget.name_values_button.native.isVisibleTo(widget)
    assert "the store's classes (1 = class 0" in widget.name_values_button.text
    widget.name_values()  # "my values are the store's classes"
    assert drawn.metadata["finemask"]["classes"] == store.class_names
    assert not widget.name_values_button.native.isVisibleTo(widget)

    asked: list[str] = []
    answers = ["No"]
    timer = answer_questions(answers, asked)
    try:
        widget.save()  # over the frame's labels, from a layer of another origin: asks, "No" keeps them
        assert asked and "Replace them with 'drawn'" in asked[0] and not widget.busy
        np.testing.assert_array_equal(store.load(pair.id)[1], stored)
        answers.append("Yes")
        run_job(qtbot, widget, widget.save)
        assert len(asked) == 2 and store.get(pair.id).history_length == 1
        np.testing.assert_array_equal(store.load(pair.id)[1][:20], 0)  # value 1 = the store's class 0

        answers.append("No")  # the drawn layer, saved there once, and the frame's segmentation: no question
        run_job(qtbot, widget, widget.save)
        widget.labels_choice.value = viewer.layers["frame labels"]
        run_job(qtbot, widget, widget.save)
    finally:
        timer.stop()
    assert len(asked) == 2 and store.get(pair.id).history_length == 3


# ------------------------------------------------------------------ 6. the writer napari chooses


def test_napari_save_of_finemask_labels_keeps_names_and_colours(make_napari_viewer, qtbot, scene, tmp_path,
                                                                named_models):
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    widget.image_choice.value = viewer.add_image(scene, name="fundus")
    widget.add_model_folder(named_models[0])
    run_job(qtbot, widget, widget.segment)
    labels = viewer.layers["fundus labels"]
    viewer.layers.selection.active = labels
    _, writers = _npe2.file_extensions_string_for_layers([labels])  # the save dialog's file types
    naparis = next(w for w in writers if w.plugin_name == "napari")  # napari's labels writer (uint32 class + 1)
    written = viewer.layers.save(str(tmp_path / "fundus.tif"), selected=True, _writer=naparis)
    assert written == [str(tmp_path / "fundus.finemask.tif")] and not (tmp_path / "fundus.tif").exists()
    stored = tifffile.imread(written[0])
    assert stored.dtype == np.uint16  # class ids, not class + 1 in uint32
    np.testing.assert_array_equal(stored, labels.data.astype(np.uint16) - 1)
    info = read_label_info(written[0])
    assert info["classes"] == ["background", "lesion", "disc"]
    assert info["palette"] == labels.metadata["finemask"]["palette"]

    (reopened,) = viewer.open(written[0], plugin="finemask")
    np.testing.assert_array_equal(reopened.data, labels.data)
    assert reopened.metadata["finemask"]["classes"] == ["background", "lesion", "disc"]
    np.testing.assert_allclose(reopened.get_color(3), labels.get_color(3))
    plain = viewer.add_labels(np.ones((4, 4), np.uint8), name="plain")  # not FineMask's: napari's writer
    viewer.layers.selection.active = plain
    assert viewer.layers.save(str(tmp_path / "plain.tif"), selected=True, _writer=naparis) == \
        [str(tmp_path / "plain.tif")]


# ------------------------------------------------------------------ 7. fine-tuning status


def _wait_for(qtbot, widget, text: str) -> None:
    qtbot.waitUntil(lambda: text in widget.job_message.value, timeout=60_000)


def test_fine_tuning_status_cancel_resume_and_time_budget(make_napari_viewer, qtbot, tmp_path, tiny_models):
    store = Store.open(tmp_path / "store")
    for seed in (0, 1, 2):
        image = make_scene(seed=seed)
        store.add(image, np.ones(image.shape[:2], np.uint8), origin="corrected")
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    assert widget.minutes.value == 5.0  # a time budget by default, said before starting
    assert widget.duration_info.value.startswith("Expected: about 5 min (the time budget")
    widget.add_model_folder(tiny_models[0])
    widget.store_dir.value = store.root
    widget.finetune_options = {"batch_size": 2, "crop": (32, 32), "log_every": 1, "ckpt_every": 100}
    widget.steps.value = 100_000
    widget.minutes.value = 0.0
    assert "no time limit" in widget.duration_info.value

    widget.finetune()
    _wait_for(qtbot, widget, "step ")
    assert "ETA 0:00" not in widget.job_message.value  # step 1 already has an estimate
    first_loss = widget.loss_history[0]
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert isinstance(widget.last_error, Cancelled)
    message = widget.job_message.value
    assert message.startswith("fine-tuning: cancelled after") and "done" not in message
    assert widget.progress_bar.value < widget.progress_bar.max
    assert widget.finetune_info.value.startswith("cancelled after")

    reports = len(widget.loss_history)
    widget.finetune()  # the same run again: resumed, with its first loss
    qtbot.waitUntil(lambda: len(widget.loss_history) > reports, timeout=60_000)
    assert widget.loss_history[0] == first_loss and f"first {first_loss:.4f}" in widget.loss_label.value
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)

    widget.minutes.value = 0.02  # 1.2 s: the time budget ends the run long before 100000 steps
    run_job(qtbot, widget, widget.finetune)
    result = widget.last_result
    assert result.steps < 100_000
    assert f"{result.steps} steps in" in widget.finetune_info.value and "stopped by the" in widget.finetune_info.value
    assert widget.job_message.value.startswith(f"fine-tuning: done, {result.steps} steps")
    widget.minutes.value = 0.0
    assert "steps at" in widget.duration_info.value  # the rate measured on this machine, for the next run


# ------------------------------------------------------------------ 8. the dock's details


def test_dock_shows_sizes_legend_mode_help_and_tidy_information(make_napari_viewer, qtbot, scene, named_models,
                                                                monkeypatch):
    from engine import refine_modes

    monkeypatch.setattr(refine_modes, "DEFAULT_MODE", "local")
    monkeypatch.setitem(refine_modes.MODE_HELP, "fast", "the global step only (said by the engine)")
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    assert widget.refine_mode.value == "local"
    assert widget.mode_help.value == refine_modes.MODE_HELP["local"]
    widget.refine_mode.value = "fast"
    assert widget.mode_help.value == "the global step only (said by the engine)"
    assert widget.working_size.specialValueText() == "model's: 240"  # camvid's own size, shown as such

    widget.image_choice.value = viewer.add_image(scene, name="fundus")
    widget.add_model_folder(named_models[0])
    assert widget.working_size.specialValueText() == "model's: 64" and widget.working_size.value() == 0
    run_job(qtbot, widget, widget.segment)
    labels = viewer.layers["fundus labels"]
    assert labels.get_color(1)[3] == 0  # background: transparent, not a black veil
    assert labels.get_color(2)[3] == 1
    assert "lesion" in widget.legend.value and "background (not drawn)" in widget.legend.value
    assert widget.legend.native.isVisibleTo(widget)
    qtbot.wait(50)

    headers = [w for w in widget.form.findChildren(type(widget.legend.native)) if "<b>" in w.text()]
    left = {w.mapTo(widget.form, QPoint(0, 0)).x() for w in headers}
    infos = [widget.segmenter_info, widget.refiner_info, widget.legend, widget.mode_help, widget.refine_source,
             widget.refine_info, widget.store_info, widget.duration_info, widget.loss_label, widget.finetune_info]
    for info in infos:
        shown = info.native.isVisibleTo(widget.form)
        assert shown == bool(info.value), info  # no empty lines leaving gaps
        if shown:
            left.add(info.native.mapTo(widget.form, QPoint(0, 0)).x())
    assert len(left) == 1, left  # one left edge for titles and information lines


# ------------------------------------------------------------------ 15. closing during a job


class _Endless:
    """A segmenter that works until cancelled, checking every half second (one step of real work,
    say a batch of 4K tiles, between checks); records when its thread leaves the job."""

    def __init__(self):
        self.classes = ["a", "b"]
        self.palette = [[0, 0, 0], [255, 255, 255]]
        self.card = SimpleNamespace(name="endless")
        self.started, self.left = threading.Event(), threading.Event()

    def predict_batch(self, images, working_size=None, on_progress=None, cancel=None):
        self.started.set()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if cancel():
                    raise Cancelled("cancelled")
                time.sleep(0.5)
            raise AssertionError("nobody cancelled this job")
        finally:
            self.left.set()


def test_closing_the_viewer_during_a_job_stops_and_joins_its_thread(make_napari_viewer, qtbot, scene):
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer)
    widget.image_choice.value = viewer.add_image(scene, name="scene")
    endless = _Endless()
    widget.models.segmenter = lambda source: endless
    widget.segment()
    qtbot.waitUntil(endless.started.is_set, timeout=10_000)
    assert QThreadPool.globalInstance().activeThreadCount() >= 1
    viewer.close()
    assert endless.left.is_set()  # the job was cancelled and its thread left it before close returned
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=5_000)
    assert len(widget.models) == 0  # no loaded model outlives the viewer
