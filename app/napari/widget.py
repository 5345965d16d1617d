"""The FineMask dock widget: Model, Segment, Refine, Correct and save, Fine-tune.

A thin magicgui/Qt shell over ``logic.py`` and the workbench (``app.workbench``, shared with the
web app). Every model job (segmentation, refinement, saving, undo, fine-tuning) runs in a napari
worker thread; progress crosses to the UI thread through a
queued Qt signal and is shown in the widget and in napari's activity panel. Errors become napari
notifications that name the cause; Cancel stops a job at its next check.
"""
# No ``from __future__ import annotations``: napari reads the ``viewer`` annotation at runtime
# to inject the viewer when it opens the widget from the manifest.
import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
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
from qtpy.QtCore import QObject, Qt, Signal, Slot
from qtpy.QtWidgets import QComboBox, QScrollArea

from app.workbench import WORKING_SIZE_RANGE, FinetuneCancelled, ModelCatalog
from engine.errors import Cancelled, FineMaskError
from engine.refine_modes import MODE_HELP, REFINE_MODES
from engine.store import Store

from . import logic

log = logging.getLogger(__name__)
NO_IMAGE = "choose the Image layer the labels belong to (Segment section)"
CHANGES_COLOURS = {None: (1.0, 1.0, 0.0, 1.0), 0: logic.TRANSPARENT, 1: (1.0, 1.0, 0.0, 1.0)}


class _Relay(QObject):
    """Carries progress reports from a worker thread to the UI thread (a queued signal)."""

    progressed = Signal(int, int, str)

    def __init__(self, callback: Callable[[int, int, str], None]):
        super().__init__()
        self._callback = callback
        self.progressed.connect(self._deliver)

    def report(self, done: int, total: int, message: str) -> None:
        """Called in the worker thread; the callback runs later in the UI thread."""
        self.progressed.emit(int(done), int(total), str(message))

    @Slot(int, int, str)
    def _deliver(self, done: int, total: int, message: str) -> None:
        self._callback(done, total, message)


def _mark_corrected(info: dict, event: Any = None) -> None:
    """Paint events of a FineMask Labels layer: its labels now count as "corrected", and the
    segmentation's class probabilities no longer describe them (Refine then goes without, as in
    the web app)."""
    info["origin"] = "corrected"
    info.pop("probs", None)


def _detach(handler: Callable, events: tuple, viewer: Any, cancel: Callable[[], None], *_) -> None:
    """When the dock widget is deleted: stop its job and its layer-event handlers."""
    cancel()
    for event in events:
        event.disconnect(handler)
    for layer in viewer.layers:
        layer.events.name.disconnect(handler)


def _header(text: str) -> Label:
    """A section title spanning the dock's width."""
    label = Label(value=f"<b>{text}</b>")
    label.native.setStyleSheet("margin-top: 8px; border-bottom: 1px solid gray;")
    return label


class FineMaskWidget(QScrollArea):
    """Dock widget. ``finetune_options``: extra ``FinetuneConfig`` fields (e.g. a small crop).

    A QScrollArea around a magicgui form: the form is taller than many screens, and napari docks
    a magicgui ``scrollable`` container without its scroll area (it then overflows sideways).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.form = Container(labels=False)
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
        self._cancel = threading.Event()
        self._bar: napari_progress | None = None
        self._relay = _Relay(self._on_progress)

        # Model
        self._lists: dict[str, list[logic.ModelEntry]] = {"segmentation": [], "refinement": []}
        self.segmenter_choice = ComboBox(label="Segmenter", choices=partial(self._model_options, "segmentation"))
        self.segmenter_info = Label(value="")
        self.refiner_choice = ComboBox(label="Refiner", choices=partial(self._model_options, "refinement"))
        self.refiner_info = Label(value="")
        self.model_folder = FileEdit(label="Add model folder", mode="d", nullable=True)
        # Segment
        self.image_choice = ComboBox(label="Image", choices=self._image_layers, nullable=True)
        self.working_size = SpinBox(label="Working size (px, 0 = model's)", min=0, max=WORKING_SIZE_RANGE[1],
                                    value=0)
        self.segment_button = PushButton(text="Segment")
        # Refine
        self.labels_choice = ComboBox(label="Labels", choices=self._labels_layers, nullable=True)
        # "full" by default (the user's own machine); the web app defaults to "fast" (a shared server)
        self.refine_mode = RadioButtons(label="Mode", choices=list(REFINE_MODES), value="full",
                                        orientation="horizontal",
                                        tooltip="\n".join(f"{k}: {v}" for k, v in MODE_HELP.items()))
        self.refine_button = PushButton(text="Refine")
        self.show_changes = CheckBox(text="Show what changed", value=False)
        self.refine_info = Label(value="")
        # Correct and save
        self.save_labels_choice = ComboBox(label="Labels", choices=self._labels_layers, nullable=True)
        self.paint_class = ComboBox(label="Paint class", choices=self._class_choices, nullable=True)
        self.store_dir = FileEdit(label="Store folder", mode="d", nullable=True)
        self.save_button = PushButton(text="Save to store")
        self.undo_button = PushButton(text="Undo last save")
        self.store_info = Label(value="")
        # Fine-tune
        self.finetune_target = RadioButtons(label="Model", choices=["segmenter", "refiner"], value="segmenter",
                                            orientation="horizontal")
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=300)
        self.minutes = FloatSpinBox(label="Time budget (min, 0 = none)", min=0.0, max=100_000.0, value=0.0,
                                    step=1.0)
        self.finetune_button = PushButton(text="Start fine-tuning")
        self.loss_label = Label(value="")
        self.finetune_info = Label(value="")
        # Job
        self.progress_bar = ProgressBar(value=0, min=0, max=1)
        self.job_message = Label(value="")
        self.cancel_button = PushButton(text="Cancel", enabled=False)

        def section(title: str, *widgets, labels: bool = True) -> tuple[Label, Container]:
            return _header(title), Container(widgets=list(widgets), labels=labels)

        self.form.extend([w for pair in (
            section("Model", self.segmenter_choice, self.segmenter_info, self.refiner_choice, self.refiner_info,
                    self.model_folder),
            section("Segment", self.image_choice, self.working_size, self.segment_button),
            section("Refine", self.labels_choice, self.refine_mode, self.refine_button, self.show_changes,
                    self.refine_info),
            section("Correct and save", self.save_labels_choice, self.paint_class, self.store_dir,
                    Container(widgets=[self.save_button, self.undo_button], layout="horizontal", labels=False),
                    self.store_info),
            section("Fine-tune", self.finetune_target, self.steps, self.minutes, self.finetune_button,
                    self.loss_label, self.finetune_info),
            section("Job", self.progress_bar, self.job_message, self.cancel_button, labels=False),
        ) for w in pair])
        for label in (self.segmenter_info, self.refiner_info, self.refine_info, self.store_info, self.loss_label,
                      self.finetune_info, self.job_message):
            label.native.setWordWrap(True)  # long model names and metrics wrap instead of widening the dock
        for combo in (self.segmenter_choice, self.refiner_choice, self.image_choice, self.labels_choice,
                      self.save_labels_choice, self.paint_class):
            combo.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.native.setMinimumContentsLength(16)
        self.setWidget(self.form.native)
        self.setWidgetResizable(True)  # scroll vertically on small screens, never sideways
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setMinimumWidth(self.form.native.minimumSizeHint().width() + 20)
        self._action_buttons = [self.segment_button, self.refine_button, self.save_button, self.undo_button,
                                self.finetune_button]

        self.segmenter_choice.changed.connect(self._show_model_info)
        self.refiner_choice.changed.connect(self._show_model_info)
        self.model_folder.changed.connect(self._on_model_folder)
        self.segment_button.changed.connect(self.segment)
        self.refine_button.changed.connect(self.refine)
        self.show_changes.changed.connect(self._on_show_changes)
        self.save_labels_choice.changed.connect(lambda *_: self.paint_class.reset_choices())
        self.paint_class.changed.connect(self._on_paint_class)
        self.store_dir.changed.connect(self._on_store_dir)
        self.save_button.changed.connect(self.save)
        self.undo_button.changed.connect(self.undo)
        self.finetune_button.changed.connect(self.finetune)
        self.cancel_button.changed.connect(self.cancel)
        layer_events = (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved)
        for event in layer_events:
            event.connect(self._on_layers_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self.destroyed.connect(
            partial(_detach, self._on_layers_changed, layer_events, viewer, self._cancel_current))

        self.refresh_models()
        remembered = logic.load_settings().get("store")
        if remembered and Path(remembered).is_dir():
            self.store_dir.value = remembered  # opens it through _on_store_dir

    # ------------------------------------------------------------------ state

    def reset_choices(self, *_) -> None:
        """Re-read the layer lists of the combo boxes (napari calls this when layers change)."""
        self.form.reset_choices()

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

    # ------------------------------------------------------------------ actions

    def segment(self) -> None:
        layer = self.image_choice.value
        if layer is None:
            return self._fail("segmentation", FineMaskError("add or choose an Image layer first"))
        data, rgb, limits = self._layer_pixels(layer)
        source = self.segmenter_choice.value
        size = int(self.working_size.value) or None

        def job(on_progress, cancel):
            image = logic.image_for_engine(data, rgb, limits)
            return logic.segment(self.models.segmenter(source), image, size, on_progress, cancel)

        self._run("segmentation", job, partial(self._show_segmentation, layer, source))

    def refine(self) -> None:
        labels = self.labels_choice.value
        if labels is None:
            return self._fail("refinement", FineMaskError("choose a Labels layer to refine"))
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
            image = logic.image_for_engine(data, rgb, limits)
            return logic.refine(self.models.refiner(source), image, values, probs, mode=mode,
                                on_progress=on_progress, cancel=cancel)

        self._run("refinement", job, partial(self._show_refinement, labels, image_layer))

    def save(self) -> None:
        labels = self.save_labels_choice.value
        if labels is None:
            return self._fail("save", FineMaskError("choose the Labels layer to save"))
        if self.store is None:
            return self._fail("save", FineMaskError("choose a store folder first (Correct and save section)"))
        image_layer = self._image_for(labels)
        if image_layer is None:
            return self._fail("save", FineMaskError(NO_IMAGE))
        info = labels.metadata.setdefault("finemask", {})
        classes = info.get("classes") or self._selected_card_classes()
        data, rgb, limits = self._layer_pixels(image_layer)
        values = np.array(labels.data, copy=True)
        store, pair_id = self.store, self._pair_id(image_layer)
        image_file = image_layer.source.path or image_layer.metadata.get("source_file")
        origin, model = info.get("origin", "corrected"), info.get("model")

        def job(on_progress, cancel):
            image = logic.image_for_engine(data, rgb, limits)
            return logic.save_pair(store, image, values, classes, pair_id=pair_id, image_file=image_file,
                                   origin=origin, model_version=model, name=image_layer.name,
                                   on_progress=on_progress, cancel=cancel)

        def done(outcome: logic.SaveOutcome) -> None:
            image_layer.metadata["finemask_pair"] = {"store": str(store.root), "id": outcome.pair_id}
            info.setdefault("classes", list(classes))
            what = "added as a new pair" if outcome.created else "saved as a new version"
            self._show_store_info(f"{outcome.pair_id}: {what}")
            show_info(f"FineMask: {outcome.pair_id} {what} in {store.root}")

        self._run("save", job, done)

    def undo(self) -> None:
        labels = self.save_labels_choice.value
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
        self.loss_history = []
        self.loss_label.value = ""
        self.finetune_info.value = ""

        def job(on_progress, cancel):
            return logic.finetune(store, base, steps=steps, time_budget_s=budget, on_progress=on_progress,
                                  cancel=cancel, **options)

        def done(result) -> None:
            key = "segmenter" if combo is self.segmenter_choice else "refiner"
            self.refresh_models(**{key: str(result.model_path)})
            line = logic.evaluation_line(result.before, result.after)
            self.finetune_info.value = f"{result.name}: {line}"
            show_info(f"FineMask: new model {result.name} selected ({line})")

        self._run("fine-tuning", job, done)

    def cancel(self) -> None:
        """Ask the running job to stop at its next check."""
        if self._worker is not None:
            self._cancel.set()
            self.job_message.value = f"cancelling {self._job}…"

    def _cancel_current(self) -> None:
        self._cancel.set()

    # ------------------------------------------------------------------ job plumbing

    def _run(self, kind: str, job: Callable, on_done: Callable[[Any], None]) -> None:
        if self._worker is not None:
            show_warning(f"FineMask is busy with {self._job}; wait for it or press Cancel")
            return
        self._cancel = threading.Event()
        self._job = kind
        self.last_error = None
        # FunctionWorker rather than create_worker: napari 0.9's create_worker connects a status
        # callback to ``errored`` with the wrong arity (TypeError on every failed job).
        worker = FunctionWorker(job, on_progress=self._relay.report, cancel=self._cancel.is_set)
        worker.returned.connect(partial(self._on_returned, kind, on_done))
        worker.errored.connect(partial(self._on_errored, kind))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._bar = napari_progress(total=0, desc=f"FineMask {kind}")
        self.progress_bar.max, self.progress_bar.value = 1, 0
        self.job_message.value = f"{kind}…"
        for button in self._action_buttons:
            button.enabled = False
        self.cancel_button.enabled = True
        worker.start()

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self._worker is None:
            return
        total = max(int(total), 1)
        self.progress_bar.max = total
        self.progress_bar.value = min(max(int(done), 0), total)
        self.job_message.value = message
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
            self.loss_label.value = f"loss {loss:.4f} (first {first:.4f}, {len(self.loss_history)} reports)"

    def _on_returned(self, kind: str, on_done: Callable[[Any], None], result: Any) -> None:
        self.last_result = result
        self.job_message.value = f"{kind}: done"
        try:
            on_done(result)
        except Exception as exc:  # noqa: BLE001 - shown to the user, never silent
            self._on_errored(kind, exc)

    def _on_errored(self, kind: str, exc: BaseException) -> None:
        self._fail(kind, exc)

    def _fail(self, kind: str, exc: BaseException) -> None:
        self.last_error = exc
        self.job_message.value = f"{kind}: {'cancelled' if isinstance(exc, Cancelled) else 'failed'}"
        if isinstance(exc, FinetuneCancelled):
            self.finetune_info.value = f"cancelled after {exc.steps} steps; Start continues the run"
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
        for button in self._action_buttons:
            button.enabled = True
        self.cancel_button.enabled = False
        if self.last_error is None:
            self.progress_bar.value = self.progress_bar.max

    # ------------------------------------------------------------------ results

    def _show_segmentation(self, image_layer: Image, source: str, seg: logic.Segmentation) -> None:
        placement = self._placement(image_layer)
        self.viewer.add_image(seg.uncertainty, name=f"{image_layer.name} uncertainty", colormap="magma",
                              contrast_limits=(0.0, 1.0), blending="additive", opacity=0.7, **placement)
        info = {"classes": seg.classes, "palette": seg.palette, "model": seg.model_name, "source": source,
                "image_layer": image_layer.name, "origin": "predicted", "probs": seg.probs}
        labels = self._add_labels(seg.values, f"{image_layer.name} labels", info, placement)
        self.labels_choice.value = labels
        self.save_labels_choice.value = labels
        h, w = seg.working_size
        self.job_message.value = f"segmented at {w}x{h} with {seg.model_name}"

    def _show_refinement(self, labels: Labels, image_layer: Image, result: logic.Refinement) -> None:
        info = dict(labels.metadata.get("finemask", {}))
        info.pop("probs", None)  # the refined labels are no longer the segmentation the probabilities describe
        info.update(origin="refined", image_layer=image_layer.name)
        if "palette" not in info:  # a layer FineMask did not make: keep its own colours
            info["colormap"] = labels.colormap
        placement = self._placement(labels)
        changes = self.viewer.add_labels(result.changed.astype(np.uint8), name=f"{labels.name} changes",
                                         colormap=CHANGES_COLOURS, visible=bool(self.show_changes.value),
                                         metadata={"finemask_changes": True}, **placement)
        changes.editable = False
        refined = self._add_labels(result.values, f"{labels.name} refined", info, placement)
        self.labels_choice.value = refined
        self.save_labels_choice.value = refined
        self.refine_info.value = f"{100 * result.changed_fraction:.2f}% of the pixels changed"

    def _add_labels(self, values: np.ndarray, name: str, info: dict, placement: dict) -> Labels:
        kwargs: dict[str, Any] = {}
        if "palette" in info:
            kwargs["colormap"] = logic.label_colours(info["palette"])
            kwargs["features"] = logic.class_features(info["classes"])
        elif info.get("colormap") is not None:
            kwargs["colormap"] = info.pop("colormap")
        layer = self.viewer.add_labels(values, name=name, opacity=0.6, metadata={"finemask": info},
                                       **placement, **kwargs)
        layer.events.paint.connect(partial(_mark_corrected, info))
        self.viewer.layers.selection.active = layer
        return layer

    # ------------------------------------------------------------------ helpers

    def _layer_pixels(self, layer: Image) -> tuple[Any, bool, Any]:
        data = layer.data[0] if layer.multiscale else layer.data
        return np.asarray(data), bool(layer.rgb), tuple(layer.contrast_limits)

    @staticmethod
    def _placement(layer) -> dict[str, Any]:
        return {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}

    def _image_for(self, labels: Labels) -> Image | None:
        """The Image layer a Labels layer belongs to: the one it was made from, else the chosen one."""
        name = labels.metadata.get("finemask", {}).get("image_layer")
        if name is not None and name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            return self.viewer.layers[name]
        return self.image_choice.value

    def _pair_id(self, image_layer: Image) -> str | None:
        ref = image_layer.metadata.get("finemask_pair")
        if ref and self.store is not None and ref.get("store") == str(self.store.root):
            return ref.get("id")
        return None

    def _selected_card_classes(self) -> list[str]:
        choice = self._choices.get(self.segmenter_choice.value)
        if choice is None or choice.card is None or not choice.card.classes:
            raise FineMaskError("this Labels layer has no class names: select the segmentation model it uses")
        return list(choice.card.classes)

    def _image_layers(self, widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)
                and not layer.name.endswith(" uncertainty")]

    def _labels_layers(self, widget=None) -> list[tuple[str, Labels]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels)
                and not layer.metadata.get("finemask_changes")]

    def _class_choices(self, widget=None) -> list[tuple[str, int]]:
        layer = self.save_labels_choice.value if hasattr(self, "save_labels_choice") else None
        classes = layer.metadata.get("finemask", {}).get("classes") if layer is not None else None
        if not classes:
            return []
        return [("unlabelled (eraser)", 0)] + [(name, k + 1) for k, name in enumerate(classes)]

    def _on_layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if getattr(event, "type", "") == "inserted" and layer is not None:
            layer.events.name.connect(self._on_layers_changed)
        self.reset_choices()

    def _show_model_info(self, *_) -> None:
        for combo, label in ((self.segmenter_choice, self.segmenter_info),
                             (self.refiner_choice, self.refiner_info)):
            choice = self._choices.get(combo.value)
            label.value = logic.metrics_details(choice.card if choice else None)

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
            self.store_info.value = message
            return
        pairs = len(self.store.pairs())
        text = f"{pairs} pair{'s' if pairs != 1 else ''} in {self.store.root.name}"
        self.store_info.value = f"{message}; {text}" if message else text

    def _on_show_changes(self, visible: bool) -> None:
        for layer in self.viewer.layers:
            if layer.metadata.get("finemask_changes"):
                layer.visible = bool(visible)

    def _on_paint_class(self, value) -> None:
        layer = self.save_labels_choice.value
        if layer is None or value is None:
            return
        layer.selected_label = int(value)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint" if value else "erase"
