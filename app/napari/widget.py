"""The FineMask dock widget: Model, Image and labels, Segment, Refine, Correct and save, Fine-tune.

A thin magicgui/Qt shell over ``logic.py`` and the workbench (``app.workbench``, shared with the
web app). Every model job (segmentation, refinement, saving, undo, fine-tuning) runs in a napari
worker thread; progress crosses to the UI thread through a queued Qt signal and is shown in the
job line at the top of the dock (always visible: message, bar, Cancel) and in napari's activity
panel. Errors become napari notifications that name the cause; Cancel stops a job at its next
check. Closing the viewer (its main window, the dock widget, or the application) cancels the
running job, waits for its thread to leave it and releases the loaded models.

One notion of "the labels being worked on": the Labels picker. Segment and Refine set it to their
result; Refine of an untouched refinement starts again from the labels it refined (comparing modes
never refines a refinement); painting a layer makes it the user's own labels.
"""
# No ``from __future__ import annotations``: napari reads the ``viewer`` annotation at runtime
# to inject the viewer when it opens the widget from the manifest.
import logging
import re
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.qt.threading import FunctionWorker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.workbench import (
    WORKING_SIZE_RANGE,
    FinetuneCancelled,
    ModelCatalog,
    pair_for_file,
)
from engine import refine_modes
from engine.errors import Cancelled, FineMaskError
from engine.store import Store

from . import logic, provenance
from .job_control import SHUTDOWN_WAIT_S, CloseWatcher, JobControl, ProgressRelay
from .writer import route_saves

log = logging.getLogger(__name__)
NO_IMAGE = "choose the Image layer the labels belong to (Image and labels section)"
CHANGES_COLOURS = {None: (1.0, 1.0, 0.0, 1.0), 0: logic.TRANSPARENT, 1: (1.0, 1.0, 0.0, 1.0)}
_STEP = re.compile(r"step (\d+)/(\d+)")


def _detach(handler: Callable, events: tuple, viewer: Any, jobs: JobControl, undo_save: Callable[[], None],
            *_) -> None:
    """When the dock widget is deleted: stop its job and its layer-event handlers."""
    jobs.shutdown()
    undo_save()
    for event in events:
        event.disconnect(handler)
    for layer in viewer.layers:
        layer.events.name.disconnect(handler)
    app = QApplication.instance()
    if app is not None:
        try:
            app.aboutToQuit.disconnect(jobs.shutdown)
        except (RuntimeError, TypeError):
            pass


def _set_info(label: Label, text: str) -> None:
    """An information line: shown with text, hidden when empty (no blank gaps in the dock)."""
    label.value = text
    label.native.setVisible(bool(text))


def _header(text: str) -> QLabel:
    """A section title spanning the dock's width."""
    label = QLabel(f"<b>{text}</b>")
    label.setStyleSheet("margin-top: 8px; border-bottom: 1px solid gray;")
    return label


class FineMaskWidget(QWidget):
    """Dock widget. ``finetune_options``: extra ``FinetuneConfig`` fields (e.g. a small crop).

    The job line sits above a scroll area holding the sections: the sections are taller than many
    screens, the job line must stay in sight during long jobs.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.models = logic.ModelCache()
        self.catalog = ModelCatalog(cache=self.models)
        self.store: Store | None = None
        self.finetune_options: dict[str, Any] = {}
        self.last_result: Any = None
        self.last_error: BaseException | None = None
        self.loss_history: list[float] = []
        self._choices: dict[str, logic.ModelEntry] = {}
        self._worker = None
        self._job = ""
        self._jobs = JobControl(self.models)
        self._bar: napari_progress | None = None
        self._close_watcher: CloseWatcher | None = None
        self._relay = ProgressRelay(self._on_progress)
        self._train_started: float | None = None
        self._budget_s: float | None = None
        self._resume_key: tuple | None = None
        self._pending_resume_key: tuple | None = None

        # Job line (top, always visible)
        self.job_message = Label(value="no job running")
        self.progress_bar = ProgressBar(value=0, min=0, max=1)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        # Model
        self._lists: dict[str, list[logic.ModelEntry]] = {"segmentation": [], "refinement": []}
        self.segmenter_choice = ComboBox(label="Segmenter", choices=partial(self._model_options, "segmentation"))
        self.segmenter_info = Label(value="")
        self.refiner_choice = ComboBox(label="Refiner", choices=partial(self._model_options, "refinement"))
        self.refiner_info = Label(value="")
        self.model_folder = FileEdit(label="Add model folder", mode="d", nullable=True)
        # Image and labels
        self.image_choice = ComboBox(label="Image", choices=self._image_layers, nullable=True)
        self.labels_choice = ComboBox(label="Labels", choices=self._labels_layers, nullable=True,
                                      tooltip="the labels being worked on: refined, painted, saved")
        self.legend = Label(value="")
        # Segment
        # A plain QSpinBox: it shows the model's own size at 0 (magicgui's spin box has no special text).
        self.working_size = QSpinBox()
        self.working_size.setRange(0, WORKING_SIZE_RANGE[1])
        self.working_size.setSingleStep(16)
        self.working_size.setToolTip("longer side of the image the segmenter sees, in pixels; "
                                     f"{WORKING_SIZE_RANGE[0]}..{WORKING_SIZE_RANGE[1]}, or 0 for the model's own")
        self.segment_button = PushButton(text="Segment")
        # Refine
        # The engine's default mode and help lines, read when the dock opens (set from measurements there).
        self.refine_mode = RadioButtons(label="Mode", choices=list(refine_modes.REFINE_MODES),
                                        value=refine_modes.DEFAULT_MODE, orientation="horizontal",
                                        tooltip="\n".join(f"{k}: {v}" for k, v in refine_modes.MODE_HELP.items()))
        self.mode_help = Label(value="")
        self.refine_source = Label(value="")
        self.refine_button = PushButton(text="Refine")
        self.show_changes = CheckBox(text="Show what changed", value=False)
        self.refine_info = Label(value="")
        # Correct and save
        self.paint_class = ComboBox(label="Paint class", choices=self._class_choices, nullable=True)
        self.name_values_button = PushButton(text="Name its values")
        self.store_dir = FileEdit(label="Store folder", mode="d", nullable=True)
        self.save_button = PushButton(text="Save to store")
        self.undo_button = PushButton(text="Undo last save")
        self.store_info = Label(value="")
        # Fine-tune
        self.finetune_target = RadioButtons(label="Model", choices=["segmenter", "refiner"], value="segmenter",
                                            orientation="horizontal")
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=300)
        self.minutes = FloatSpinBox(label="Time budget (min)", min=0.0, max=100_000.0, value=5.0, step=1.0,
                                    tooltip="the run stops after this many minutes or the steps, whichever "
                                            "comes first; 0 = no time limit")
        self.duration_info = Label(value="")
        self.finetune_button = PushButton(text="Start fine-tuning")
        self.loss_label = Label(value="")
        self.finetune_info = Label(value="")

        self._build_layout()
        self._action_buttons = [self.segment_button, self.refine_button, self.save_button, self.undo_button,
                                self.finetune_button]

        self.segmenter_choice.changed.connect(self._show_model_info)
        self.refiner_choice.changed.connect(self._show_model_info)
        self.model_folder.changed.connect(self._on_model_folder)
        self.labels_choice.changed.connect(self._on_labels_choice)
        self.segment_button.changed.connect(self.segment)
        self.refine_mode.changed.connect(self._show_mode_help)
        self.refine_button.changed.connect(self.refine)
        self.show_changes.changed.connect(self._on_show_changes)
        self.paint_class.changed.connect(self._on_paint_class)
        self.name_values_button.changed.connect(self.name_values)
        self.store_dir.changed.connect(self._on_store_dir)
        self.save_button.changed.connect(self.save)
        self.undo_button.changed.connect(self.undo)
        for control in (self.finetune_target, self.steps, self.minutes):
            control.changed.connect(self._show_duration)
        self.finetune_button.changed.connect(self.finetune)
        self.cancel_button.changed.connect(self.cancel)
        layer_events = (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved)
        for event in layer_events:
            event.connect(self._on_layers_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        undo_save = route_saves(viewer.layers, self._on_file_saved)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._jobs.shutdown)
        self.destroyed.connect(partial(_detach, self._on_layers_changed, layer_events, viewer, self._jobs, undo_save))

        self.refresh_models()
        self.reset_choices()
        self._show_mode_help()
        self._on_labels_choice()
        remembered = logic.load_settings().get("store")
        if remembered and Path(remembered).is_dir():
            self.store_dir.value = remembered  # opens it through _on_store_dir
        self._show_duration()

    def _build_layout(self) -> None:
        job_row = QHBoxLayout()
        job_row.setContentsMargins(0, 0, 0, 0)
        job_row.addWidget(self.progress_bar.native, 1)
        job_row.addWidget(self.cancel_button.native)
        job = QVBoxLayout()
        job.setContentsMargins(6, 6, 6, 4)
        message = self.job_message.native
        message.setWordWrap(True)  # two lines always: no jumping as messages come and go
        message.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)  # magicgui's is Fixed wide
        message.setFixedHeight(2 * message.fontMetrics().lineSpacing() + 12)
        message.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        job.addWidget(message)
        job.addLayout(job_row)

        # One column of rows (a QVBoxLayout: word-wrapped lines get their height, which grid and
        # form layouts inside a scroll area do not give): a name then the control, names of one
        # width (:meth:`_align_names`); information lines, buttons and section titles span the row,
        # so they all share one left edge.
        self.form = QWidget()
        rows = QVBoxLayout(self.form)
        self._names: list[QLabel] = []

        def add(widget: Any) -> None:
            if isinstance(widget, tuple):  # buttons side by side
                pair = QHBoxLayout()
                for b in widget:
                    pair.addWidget(b.native)
                rows.addLayout(pair)
            elif isinstance(widget, (Label, PushButton, CheckBox, QLabel)):
                rows.addWidget(getattr(widget, "native", widget))
            else:
                text, control = ("Working size (px)", widget) if isinstance(widget, QSpinBox) else (
                    widget.label, widget.native)
                name = QLabel(text)
                self._names.append(name)
                row = QHBoxLayout()
                row.addWidget(name)
                row.addWidget(control, 1)
                rows.addLayout(row)

        def section(title: str, *widgets) -> None:
            add(_header(title))
            for w in widgets:
                add(w)

        section("Model", self.segmenter_choice, self.segmenter_info, self.refiner_choice, self.refiner_info,
                self.model_folder)
        section("Image and labels", self.image_choice, self.labels_choice, self.legend)
        section("Segment", self.working_size, self.segment_button)
        section("Refine", self.refine_mode, self.mode_help, self.refine_source, self.refine_button,
                self.show_changes, self.refine_info)
        section("Correct and save", self.paint_class, self.name_values_button, self.store_dir,
                (self.save_button, self.undo_button), self.store_info)
        section("Fine-tune", self.finetune_target, self.steps, self.minutes, self.duration_info,
                self.finetune_button, self.loss_label, self.finetune_info)
        rows.addStretch(1)
        self._align_names()
        for label in (self.segmenter_info, self.refiner_info, self.legend, self.mode_help, self.refine_source,
                      self.refine_info, self.store_info, self.duration_info, self.loss_label, self.finetune_info):
            label.native.setWordWrap(True)  # long model names and metrics wrap instead of widening the dock
            label.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)  # full width
            _set_info(label, label.value)
        self.legend.native.setTextFormat(Qt.TextFormat.RichText)
        self.name_values_button.native.setVisible(False)
        for combo in (self.segmenter_choice, self.refiner_choice, self.image_choice, self.labels_choice,
                      self.paint_class):
            combo.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.native.setMinimumContentsLength(16)

        self.scroll = QScrollArea()
        self.scroll.setWidget(self.form)
        self.scroll.setWidgetResizable(True)  # scroll vertically on small screens, never sideways
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        outer.addLayout(job)
        outer.addWidget(self.scroll, 1)
        self.setMinimumWidth(self.form.minimumSizeHint().width() + 24)

    def _align_names(self) -> None:
        """One width for the name column (again once napari's style sets the font)."""
        width = max(name.sizeHint().width() for name in self._names)
        for name in self._names:
            name.setMinimumWidth(width)

    def showEvent(self, event: Any) -> None:
        self._align_names()
        super().showEvent(event)

    # ------------------------------------------------------------------ state

    @property
    def _layer_combos(self) -> tuple[ComboBox, ...]:
        return (self.image_choice, self.labels_choice)

    def reset_choices(self, *_) -> None:
        """Re-read the layer lists of the pickers (napari calls this when layers change); a chosen
        layer stays chosen while it exists (renamed or not); an empty picker takes the newest
        suitable layer."""
        kept = {combo: combo.value for combo in self._layer_combos}
        for combo in (*self._layer_combos, self.segmenter_choice, self.refiner_choice):
            combo.reset_choices()
        for combo, value in kept.items():
            options = [data for data in combo.choices if data is not None]
            if value is not None and any(value is layer for layer in options):
                if combo.value is not value:
                    combo.value = value
            elif options:
                combo.value = options[-1]  # the newest
        self.paint_class.reset_choices()

    @property
    def busy(self) -> bool:
        """True while a job runs (one at a time)."""
        return self._worker is not None

    def refresh_models(self, segmenter: str | None = None, refiner: str | None = None) -> None:
        """Re-list shipped, fine-tuned (store) and added models; keep or set the selections."""
        self.catalog.store_root = self.store.root if self.store is not None else None
        segs = self.catalog.entries("segmentation", default=logic.DEFAULT_SEGMENTER)
        refs = self.catalog.entries("refinement", default=logic.DEFAULT_REFINER)
        self._choices = {c.source: c for c in segs + refs}
        self._lists = {"segmentation": segs, "refinement": refs}
        for combo, choices, wanted in ((self.segmenter_choice, segs, segmenter),
                                       (self.refiner_choice, refs, refiner)):
            keep = wanted or combo.value
            combo.reset_choices()
            if keep in [c.source for c in choices]:
                combo.value = keep
        self._show_model_info()

    def _model_options(self, task: str, widget=None) -> list[tuple[str, str]]:
        return [(c.label, c.source) for c in self._lists[task]]

    @property
    def extra_models(self) -> list[str]:
        """Model folders added by hand."""
        return self.catalog.folders

    def add_model_folder(self, folder: str | Path, select: bool = True) -> None:
        """Offer a model folder (segmenter or refiner) and, with ``select``, pick it."""
        entry = self.catalog.add_folder(folder)
        wanted = "segmenter" if entry.task == "segmentation" else "refiner"
        self.refresh_models(**({wanted: entry.source} if select else {}))

    def open_store(self, folder: str | Path) -> None:
        """Open (or create) the annotation store and remember it for the next session."""
        self.store = Store.open(folder, create=True)
        logic.save_settings(store=str(self.store.root))
        self.refresh_models()
        self._show_store_info()
        self._on_labels_choice()

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> bool:
        """Cancel the running job and wait for its thread to finish it; release the models."""
        return self._jobs.shutdown(wait_s)

    # ------------------------------------------------------------------ actions

    def segment(self) -> None:
        layer = self.image_choice.value
        if layer is None:
            return self._fail("segmentation", FineMaskError("add or choose an Image layer first"))
        data, rgb, limits = self._layer_pixels(layer)
        source = self.segmenter_choice.value
        size = int(self.working_size.value()) or None
        entry = self._choices.get(source)
        name = entry.key if entry is not None else str(source)

        def job(on_progress, cancel):
            on_progress(0, 1, f"loading the segmenter {name}")
            segmenter = self.models.segmenter(source)
            on_progress(0, 1, "preparing the image")
            image = logic.image_for_engine(data, rgb, limits)
            return logic.segment(segmenter, image, size, on_progress, cancel)

        self._run("segmentation", job, partial(self._show_segmentation, layer, source))

    def refine(self) -> None:
        working = self.labels_choice.value
        if working is None:
            return self._fail("refinement", FineMaskError("choose a Labels layer to refine"))
        labels = self._refine_source(working)
        image_layer = self._image_for(labels)
        if image_layer is None:
            return self._fail("refinement", FineMaskError(NO_IMAGE))
        data, rgb, limits = self._layer_pixels(image_layer)
        values = np.array(labels.data, copy=True)  # the user may keep painting meanwhile
        info = labels.metadata.get("finemask", {})
        probs = info.get("probs")
        mode = self.refine_mode.value
        source = self.refiner_choice.value

        def job(on_progress, cancel):
            on_progress(0, 1, "loading the refiner")
            refiner = self.models.refiner(source)
            image = logic.image_for_engine(data, rgb, limits)
            return logic.refine(refiner, image, values, probs, mode=mode, on_progress=on_progress, cancel=cancel)

        self._run("refinement", job, partial(self._show_refinement, labels, image_layer, mode))

    def name_values(self) -> None:
        """Say which classes the values of the working labels are (a layer without class names):
        the open store's classes, else the selected segmenter's; value k is class k - 1."""
        labels = self.labels_choice.value
        try:
            if labels is None:
                raise FineMaskError("choose the Labels layer whose values to name")
            names, palette, _ = self._class_list_for_naming()
            top = int(np.max(labels.data)) if labels.data.size else 0
            if top > len(names):
                raise FineMaskError(f"'{labels.name}' holds value {top}, but there are only {len(names)} classes "
                                    f"({', '.join(names[:6])}{', …' if len(names) > 6 else ''})")
        except FineMaskError as exc:
            return self._fail("naming classes", exc)
        info = labels.metadata.setdefault("finemask", {})
        info.update(classes=list(names), palette=palette)
        info.setdefault("origin", "corrected")
        labels.colormap = logic.label_colours(palette, names)
        labels.features = logic.class_features(names)
        self._on_labels_choice()

    def save(self) -> None:
        labels = self.labels_choice.value
        if labels is None:
            return self._fail("save", FineMaskError("choose the Labels layer to save"))
        if self.store is None:
            return self._fail("save", FineMaskError("choose a store folder first (Correct and save section)"))
        image_layer = self._image_for(labels)
        if image_layer is None:
            return self._fail("save", FineMaskError(NO_IMAGE))
        info = labels.metadata.setdefault("finemask", {})
        classes = info.get("classes")
        if not classes:
            return self._fail("save", FineMaskError(
                f"'{labels.name}' has no class names, so its values mean nothing to the store: press "
                f"'{self.name_values_button.text}' to say which classes they are"))
        store = self.store
        image_file = image_layer.source.path or image_layer.metadata.get("source_file")
        pair_id = self._pair_id(image_layer) or pair_for_file(store, image_file)
        question = (f"'{image_layer.name}' already has labels in the store (pair {pair_id}), saved from another "
                    f"layer. Replace them with '{labels.name}'?\n\nThe current version stays in the pair's "
                    "history (Undo last save brings it back).")
        other_origin = pair_id is not None and pair_id in store and not provenance.belongs_to(
            labels, image_layer, str(store.root), pair_id)
        if other_origin and not self._confirm("Replace stored labels?", question):
            self._set_job_message("save: not saved (the stored labels were kept)")
            return
        data, rgb, limits = self._layer_pixels(image_layer)
        values = np.array(labels.data, copy=True)
        origin, model = info.get("origin", "corrected"), info.get("model")

        def job(on_progress, cancel):
            image = logic.image_for_engine(data, rgb, limits)
            return logic.save_pair(store, image, values, classes, pair_id=pair_id, image_file=image_file,
                                   origin=origin, model_version=model, name=image_layer.name,
                                   on_progress=on_progress, cancel=cancel)

        def done(outcome: logic.SaveOutcome) -> None:
            ref = {"store": str(store.root), "id": outcome.pair_id}
            image_layer.metadata["finemask_pair"] = ref
            info["pair"] = dict(ref)
            what = "added as a new pair" if outcome.created else "saved as a new version"
            self._show_store_info(f"{outcome.pair_id}: {what}")
            show_info(f"FineMask: {outcome.pair_id} {what} in {store.root}")

        self._run("save", job, done)

    def undo(self) -> None:
        labels = self.labels_choice.value
        if labels is None or self.store is None:
            return self._fail("undo", FineMaskError("choose a store folder and the Labels layer you saved"))
        image_layer = self._image_for(labels)
        pair_id = self._pair_id(image_layer) if image_layer is not None else None
        if pair_id is None:
            return self._fail("undo", FineMaskError("nothing from this image was saved to the open store yet"))
        store = self.store

        def job(on_progress, cancel):
            return logic.undo_pair(store, pair_id, on_progress, cancel)

        def done(values: np.ndarray) -> None:
            if values.shape != labels.data.shape:
                raise FineMaskError("the stored labels do not fit this layer any more")
            labels.data = values.astype(labels.data.dtype, copy=False)
            self._show_store_info(f"{pair_id}: back to the previous version")
            show_info(f"FineMask: {pair_id} restored to its previous stored version")

        self._run("undo", job, done)

    def finetune(self) -> None:
        if self.store is None:
            return self._fail("fine-tuning", FineMaskError("choose a store folder with saved corrections first"))
        combo = self.segmenter_choice if self.finetune_target.value == "segmenter" else self.refiner_choice
        base = combo.value
        store, steps = self.store, int(self.steps.value)
        budget = float(self.minutes.value) * 60.0 or None
        options = dict(self.finetune_options)
        key = (str(store.root), str(base), steps, repr(sorted(options.items())))
        if key != self._resume_key:  # a resumed run keeps its loss curve (and its first loss)
            self.loss_history = []
            _set_info(self.loss_label, "")
        self._resume_key = None
        _set_info(self.finetune_info, "")
        self._budget_s, self._train_started = budget, None

        def job(on_progress, cancel):
            return logic.finetune(store, base, steps=steps, time_budget_s=budget, on_progress=on_progress,
                                  cancel=cancel, **options)

        def done(result) -> None:
            target = "segmenter" if combo is self.segmenter_choice else "refiner"
            self.refresh_models(**{target: str(result.model_path)})
            line = logic.evaluation_line(result.before, result.after)
            ran = f"{result.steps} steps in {logic.duration_text(result.seconds)}"
            if result.steps < steps:
                ran += f" (stopped by the {logic.duration_text(budget or 0)} time budget before step {steps})"
            _set_info(self.finetune_info, f"{result.name}: {line}; {ran}")
            self._set_job_message(f"fine-tuning: done, {ran}")
            self._remember_step_rate(target, result.history)
            show_info(f"FineMask: new model {result.name} selected ({line})")

        self._run("fine-tuning", job, done)
        if self.busy:
            self._pending_resume_key = key

    def cancel(self) -> None:
        """Ask the running job to stop at its next check."""
        if self._worker is not None:
            self._jobs.cancel.set()
            self._set_job_message(f"cancelling {self._job}…")

    # ------------------------------------------------------------------ job plumbing

    def _run(self, kind: str, job: Callable, on_done: Callable[[Any], None]) -> None:
        if self._worker is not None:
            show_warning(f"FineMask is busy with {self._job}; wait for it or press Cancel")
            return
        cancel = self._jobs.cancel = threading.Event()
        self._jobs.closed = False
        done = self._jobs.done = threading.Event()
        self._job = kind
        self.last_error = None

        def run(on_progress, cancel):
            try:
                return job(on_progress, cancel)
            finally:
                done.set()  # the thread has left the job (what closing the viewer waits for)

        # FunctionWorker rather than create_worker: napari 0.9's create_worker connects a status
        # callback to ``errored`` with the wrong arity (TypeError on every failed job).
        worker = FunctionWorker(run, on_progress=self._relay.report, cancel=cancel.is_set)
        worker.returned.connect(partial(self._on_returned, kind, on_done))
        worker.errored.connect(partial(self._on_errored, kind))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._bar = napari_progress(total=0, desc=f"FineMask {kind}")
        self.progress_bar.max, self.progress_bar.value = 1, 0
        self._set_job_message(f"{kind}…")
        for button in self._action_buttons:
            button.enabled = False
        self.cancel_button.enabled = True
        self._watch_window_close()
        worker.start()

    def _watch_window_close(self) -> None:
        """Watch napari's main window (the top of this dock's parents) for its closing."""
        top = self
        while top.parentWidget() is not None:
            top = top.parentWidget()
        if top is not self and (self._close_watcher is None or self._close_watcher.parent() is not top):
            self._close_watcher = CloseWatcher(top, self._jobs)

    def _set_job_message(self, text: str) -> None:
        self.job_message.value = text
        self.job_message.native.setToolTip(text)  # the whole text, should two lines not hold it

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self._worker is None or self._jobs.closed:
            return
        total = max(int(total), 1)
        step = _STEP.search(message) if self._job == "fine-tuning" else None
        if step is not None:  # training: by steps, or by time when the time budget ends it first
            now = time.monotonic()
            if self._train_started is None:
                self._train_started = now
            fraction = logic.finetune_fraction(int(step.group(1)), int(step.group(2)), now - self._train_started,
                                               self._budget_s)
            done, total = round(1000 * fraction), 1000
        self.progress_bar.max = total
        self.progress_bar.value = min(max(int(done), 0), total)
        self._set_job_message(message)
        bar = self._bar  # napari's progress may process events: the job can finish meanwhile
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.set_description(f"FineMask {self._job}: {message}"[:80])
            bar.update(min(done, total) - bar.n)
        loss = logic.parse_loss(message) if self._job == "fine-tuning" else None
        if loss is not None:
            self.loss_history.append(loss)
            first = self.loss_history[0]
            _set_info(self.loss_label, f"loss {loss:.4f} (first {first:.4f}, {len(self.loss_history)} reports)")

    def _on_returned(self, kind: str, on_done: Callable[[Any], None], result: Any) -> None:
        if self._jobs.closed:  # the viewer closed meanwhile: nothing to show it in
            return
        self.last_result = result
        self._set_job_message(f"{kind}: done")
        self.progress_bar.value = self.progress_bar.max
        try:
            on_done(result)
        except Exception as exc:  # noqa: BLE001 - shown to the user, never silent
            self._on_errored(kind, exc)

    def _on_errored(self, kind: str, exc: BaseException) -> None:
        if not self._jobs.closed:
            self._fail(kind, exc)

    def _fail(self, kind: str, exc: BaseException) -> None:
        self.last_error = exc
        self._set_job_message(f"{kind}: {'cancelled' if isinstance(exc, Cancelled) else 'failed'}")
        if isinstance(exc, FinetuneCancelled):
            self._resume_key = self._pending_resume_key
            text = f"cancelled after {exc.steps} steps; Start continues the run"
            self._set_job_message(f"fine-tuning: {text}")
            _set_info(self.finetune_info, text)
            show_info("FineMask: fine-tuning cancelled; its state is kept")
        elif isinstance(exc, Cancelled):
            show_info(f"FineMask: {kind} cancelled")
        elif isinstance(exc, FineMaskError):
            show_error(f"FineMask {kind}: {exc}")
        else:
            log.error("FineMask %s failed", kind, exc_info=(type(exc), exc, exc.__traceback__))
            show_error(f"FineMask {kind} failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jobs.closed:
            return
        for button in self._action_buttons:
            button.enabled = True
        self.cancel_button.enabled = False

    # ------------------------------------------------------------------ results

    def _show_segmentation(self, image_layer: Image, source: str, seg: logic.Segmentation) -> None:
        placement = self._placement(image_layer)
        self.viewer.add_image(seg.uncertainty, name=f"{image_layer.name} uncertainty", colormap="magma",
                              contrast_limits=(0.0, 1.0), blending="additive", opacity=0.7,
                              metadata={"finemask_uncertainty": True}, **placement)
        info = {"classes": seg.classes, "palette": seg.palette, "model": seg.model_name, "source": source,
                "image_layer": image_layer.name, "image_id": image_layer.unique_id, "origin": "predicted",
                "probs": seg.probs}
        labels = self._add_labels(seg.values, f"{image_layer.name} labels", info, placement)
        self.labels_choice.value = labels
        h, w = seg.working_size
        self._set_job_message(f"segmentation: done at {w}x{h} with {seg.model_name}")

    def _show_refinement(self, labels: Labels, image_layer: Image, mode: str, result: logic.Refinement) -> None:
        info = dict(labels.metadata.get("finemask", {}))
        info.pop("probs", None)  # the refined labels are no longer the segmentation the probabilities describe
        info.pop("pair", None)  # saved from another layer: not this one
        info.update(origin="refined", image_layer=image_layer.name, image_id=image_layer.unique_id,
                    refined_from=labels.unique_id, mode=mode)
        if "palette" not in info:  # a layer FineMask did not make: keep its own colours
            info["colormap"] = labels.colormap
        placement = self._placement(labels)
        changes = provenance.find(self.viewer.layers, lambda x: x.metadata.get("finemask_changes") == labels.unique_id)
        if changes is None:
            changes = self.viewer.add_labels(result.changed.astype(np.uint8), name=f"{labels.name} changes",
                                             colormap=CHANGES_COLOURS, visible=bool(self.show_changes.value),
                                             metadata={"finemask_changes": labels.unique_id}, **placement)
            changes.editable = False
        else:
            changes.data = result.changed.astype(np.uint8)
        # Refining again in the same mode replaces its untouched result instead of stacking layers.
        refined = provenance.find(self.viewer.layers, lambda x: isinstance(x, Labels) and x.metadata.get(
            "finemask", {}).get("refined_from") == labels.unique_id and x.metadata["finemask"].get("mode") == mode)
        if refined is None:
            refined = self._add_labels(result.values, f"{labels.name} refined ({mode})", info, placement)
        else:
            refined.data = result.values
            refined.metadata["finemask"].update(origin="refined")
        self.labels_choice.value = refined
        _set_info(self.refine_info, f"{mode}: {100 * result.changed_fraction:.2f}% of the pixels changed")

    def _add_labels(self, values: np.ndarray, name: str, info: dict, placement: dict) -> Labels:
        kwargs: dict[str, Any] = {}
        if "palette" in info:
            kwargs["colormap"] = logic.label_colours(info["palette"], info.get("classes"))
            kwargs["features"] = logic.class_features(info["classes"])
        elif info.get("colormap") is not None:
            kwargs["colormap"] = info.pop("colormap")
        layer = self.viewer.add_labels(values, name=name, opacity=0.6, metadata={"finemask": info},
                                       **placement, **kwargs)
        layer.events.paint.connect(partial(provenance.mark_corrected, info))
        self.viewer.layers.selection.active = layer
        return layer

    def _on_file_saved(self, written: list[str]) -> None:
        show_info(f"FineMask: labels with class names and colours written to {written[0]}")

    # ------------------------------------------------------------------ helpers

    def _layer_pixels(self, layer: Image) -> tuple[Any, bool, Any]:
        data = layer.data[0] if layer.multiscale else layer.data
        return np.asarray(data), bool(layer.rgb), tuple(layer.contrast_limits)

    @staticmethod
    def _placement(layer) -> dict[str, Any]:
        return {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}

    def _refine_source(self, labels: Labels) -> Labels:
        return provenance.refine_source(self.viewer.layers, labels)

    def _image_for(self, labels: Labels) -> Image | None:
        return provenance.image_for(self.viewer.layers, labels, self.image_choice.value)

    def _image_layers(self, widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in provenance.workable_images(self.viewer.layers)]

    def _labels_layers(self, widget=None) -> list[tuple[str, Labels]]:
        return [(layer.name, layer) for layer in provenance.workable_labels(self.viewer.layers)]

    def _pair_id(self, image_layer: Image) -> str | None:
        ref = image_layer.metadata.get("finemask_pair")
        if ref and self.store is not None and ref.get("store") == str(self.store.root):
            return ref.get("id")
        return None

    def _confirm(self, title: str, text: str) -> bool:
        box = QMessageBox(QMessageBox.Icon.Question, title, text,
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self)
        box.setDefaultButton(QMessageBox.StandardButton.No)
        return box.exec() == QMessageBox.StandardButton.Yes

    def _class_list_for_naming(self) -> tuple[list[str], list[list[int]], str]:
        """(names, palette, whose): the open store's classes, else the selected segmenter's."""
        from engine.io import default_palette

        choice = self._choices.get(self.segmenter_choice.value)
        card = choice.card if choice is not None else None
        card_names = list(card.classes) if card is not None and card.classes else []
        card_palette = [list(c) for c in (card.palette or [])] if card is not None else []
        if self.store is not None and self.store.class_names:
            names, whose = list(self.store.class_names), "the store's"
        elif card_names:
            names, whose = card_names, f"{choice.key}'s"
        else:
            raise FineMaskError("no class names to give: open a named store or select a segmentation model")
        palette = card_palette if card_names[: len(names)] == names[: len(card_names)] else []
        palette = (palette + default_palette(len(names))[len(palette):])[: len(names)]
        return names, palette, whose

    def _class_choices(self, widget=None) -> list[tuple[str, int]]:
        layer = self.labels_choice.value if hasattr(self, "labels_choice") else None
        classes = layer.metadata.get("finemask", {}).get("classes") if layer is not None else None
        if not classes:
            return []
        return [("unlabelled (eraser)", 0)] + [(name, k + 1) for k, name in enumerate(classes)]

    def _on_layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        inserted = getattr(event, "type", "") == "inserted" and layer is not None
        if inserted:
            layer.events.name.connect(self._on_layers_changed)
        self.reset_choices()
        if inserted:  # a layer just opened or drawn is the one to work on next
            if any(layer is x for _, x in self._image_layers()):
                self.image_choice.value = layer
            elif any(layer is x for _, x in self._labels_layers()):
                self.labels_choice.value = layer

    def _on_labels_choice(self, *_) -> None:
        """The working labels changed: paint classes, legend, naming, what Refine starts from."""
        labels = self.labels_choice.value
        self.paint_class.reset_choices()
        info = labels.metadata.get("finemask", {}) if labels is not None else {}
        classes, palette = info.get("classes"), info.get("palette") or []
        _set_info(self.legend, logic.legend_html(classes, palette) if classes else "")
        named = labels is None or bool(classes)
        if not named:
            try:
                names, _, whose = self._class_list_for_naming()
                self.name_values_button.text = f"Values are {whose} classes (1 = {names[0]}, …)"
            except FineMaskError:
                self.name_values_button.text = "Name its values"
        self.name_values_button.native.setVisible(not named)
        source = self._refine_source(labels) if labels is not None else None
        _set_info(self.refine_source, "" if source is None else f"Refines: {source.name}"
                  + (" (the labels this refinement came from)" if source is not labels else ""))

    def _show_model_info(self, *_) -> None:
        for combo, label in ((self.segmenter_choice, self.segmenter_info),
                             (self.refiner_choice, self.refiner_info)):
            choice = self._choices.get(combo.value)
            _set_info(label, logic.metrics_details(choice.card if choice else None))
        choice = self._choices.get(self.segmenter_choice.value)
        size = choice.card.input_size if choice is not None and choice.card is not None else None
        own = int(max(size)) if size else 480  # the segmenter's working size (engine.segment's default)
        self.working_size.setSpecialValueText(f"model's: {own}")
        if hasattr(self, "labels_choice"):
            self._on_labels_choice()

    def _show_mode_help(self, *_) -> None:
        _set_info(self.mode_help, refine_modes.MODE_HELP.get(self.refine_mode.value, ""))

    def _show_duration(self, *_) -> None:
        rate = logic.load_settings().get("finetune_seconds_per_step", {}).get(self.finetune_target.value)
        budget = float(self.minutes.value) * 60.0 or None
        _set_info(self.duration_info, "Expected: " + logic.expected_duration(int(self.steps.value), budget, rate))

    def _remember_step_rate(self, target: str, history: list[dict]) -> None:
        """Keep this machine's seconds per step of fine-tuning a ``target`` ("segmenter",
        "refiner"): the next run's expected duration."""
        start = len(history) - 1  # the last sitting: "time" restarts at each resume
        while start > 0 and history[start - 1]["time"] <= history[start]["time"]:
            start -= 1
        first, last = history[start], history[-1]
        if last["step"] <= first["step"] or last["time"] <= first["time"]:
            return
        rate = (last["time"] - first["time"]) / (last["step"] - first["step"])
        rates = dict(logic.load_settings().get("finetune_seconds_per_step", {}))
        rates[target] = round(float(rate), 4)
        logic.save_settings(finetune_seconds_per_step=rates)
        self._show_duration()

    def _on_model_folder(self, value) -> None:
        if value is None or str(value) in ("", "."):
            return
        try:
            self.add_model_folder(value)
        except FineMaskError as exc:
            self._fail("model", exc)

    def _on_store_dir(self, value) -> None:
        if value is None or str(value) in ("", "."):
            return
        try:
            self.open_store(value)
        except FineMaskError as exc:
            self.store = None
            self._fail("store", exc)

    def _show_store_info(self, message: str = "") -> None:
        if self.store is None:
            _set_info(self.store_info, message)
            return
        pairs = len(self.store.pairs())
        text = f"{pairs} pair{'s' if pairs != 1 else ''} in {self.store.root.name}"
        _set_info(self.store_info, f"{message}; {text}" if message else text)

    def _on_show_changes(self, visible: bool) -> None:
        for layer in self.viewer.layers:
            if layer.metadata.get("finemask_changes"):
                layer.visible = bool(visible)

    def _on_paint_class(self, value) -> None:
        layer = self.labels_choice.value
        if layer is None or value is None:
            return
        layer.selected_label = int(value)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint" if value else "erase"
