"""The web app's side of the workbench: server settings, one store, each browser session's work.

:class:`Workbench` is created once per server. It holds the settings, the annotation store, the
model catalog (``app.workbench.ModelCatalog``: models listed and loaded once, shared with napari's
rules) and a folder for files offered for download. Each browser session (or API call) has its
own :class:`Work`: the image and its current labels. The jobs themselves (segment, refine, apply
an edit, save, undo, fine-tune) are ``app.workbench``'s, the same napari runs; this module keeps
the per-session state they act on, and the Gradio layer (``server.py``) only converts values and
shows messages.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app import workbench
from app.workbench import (  # noqa: F401 - re-exported for the server and older callers
    KEEP_PROBS_BYTES,
    MIN_SIDE,
    WORKING_SIZE_RANGE,
    ModelCatalog,
    ModelEntry,
    inspect_header,
)
from app.workbench.samples import bundled_samples
from engine.assets import SAMPLES_DIR
from engine.errors import FineMaskError
from engine.io import (
    IMAGE_SUFFIXES,
    image_shape,
    max_pixels_limit,
    read_labels,
    write_labels,
)
from engine.refine_modes import DEFAULT_MODE
from engine.store import PairRecord, Store

from .editor import EditResult, brush_colours, strokes_from_layers
from .render import class_order, class_shares, fit_size

if TYPE_CHECKING:
    from engine.refine import Refiner
    from engine.segment import Segmenter
    from training.finetune import FinetuneConfig, FinetuneResult

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

#: Labels changes (refine, correction, back to the segmentation, undo of a save) one image can
#: take back with Undo, and the memory their kept label maps may take.
HISTORY_STEPS = 10
HISTORY_BYTES = 512 << 20
#: What the uncertainty map shows after a segmentation and after a refinement.
SEGMENTER_UNCERTAINTY = "Segmenter's uncertainty: 1 − top class probability (yellow = unsure)"
REFINER_UNCERTAINTY = "Refiner's uncertainty: 1 − the refiner's confidence in the result (yellow = unsure)"


def default_store_dir() -> Path:
    """``<user data dir>/finemask/store`` (platformdirs), the default annotation store."""
    import platformdirs

    return Path(platformdirs.user_data_dir("finemask", appauthor=False)) / "store"


def bundled_examples() -> list[Path]:
    """Sample images shipped in ``assets/samples``: the described ones first, in the order
    ``samples.json`` gives them (each in a shipped model's domain first), then any others,
    smallest file first."""
    if not SAMPLES_DIR.is_dir():
        return []
    described = [s.path for s in bundled_samples(SAMPLES_DIR)]
    others = [p for p in SAMPLES_DIR.iterdir()
              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p not in described]
    return described + sorted(others, key=lambda p: (p.stat().st_size, p.name))


def _default_finetune() -> FinetuneConfig:
    from training.finetune import FinetuneConfig

    return FinetuneConfig()


@dataclass
class WebConfig:
    """Settings of one web server (``python -m app.web --help`` sets most of them).

    ``model``/``refiner``: default segmentation and refinement model (shipped or installed name,
    or folder; the refiner defaults to the official CascadePSP weights once installed, else
    refine-light). ``max_pixels``: largest image accepted (None: the limit of every front end,
    ``$FINEMASK_MAX_PIXELS`` or ``engine.io.DEFAULT_MAX_PIXELS``). ``max_file_size``: largest upload
    ("500mb", or bytes). ``concurrency``:
    model jobs (segment, refine, edit, save, fine-tune) running at once over all users; the rest
    wait in a queue of at most ``queue_size``. ``editor_max_side``: longest side of the image in
    the browser editor; larger images are edited on a preview. ``display_max_side``: longest side
    of shown images. ``finetune``: defaults of fine-tuning runs (the page sets the steps and the
    time budget).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    store: Path = field(default_factory=default_store_dir)
    model: str | Path = workbench.DEFAULT_SEGMENTER
    refiner: str | Path = field(default_factory=workbench.default_refiner_name)
    max_pixels: int | None = None
    max_file_size: str | int = "500mb"
    concurrency: int = 1
    queue_size: int = 20
    editor_max_side: int = 1280
    display_max_side: int = 2048
    device: str | None = None
    finetune: FinetuneConfig = field(default_factory=_default_finetune)
    examples: list[Path] = field(default_factory=bundled_examples)

    def pixel_limit(self) -> int:
        """``max_pixels``, else ``$FINEMASK_MAX_PIXELS``, else the engine's default (as the CLI and napari)."""
        return max_pixels_limit(self.max_pixels)


# --------------------------------------------------------------------------------------------
# One user's work


@dataclass
class LabelState:
    """What one step changed, kept so that Undo can go back: the labels and what goes with them."""

    labels: np.ndarray | None
    before: np.ndarray | None
    probs: np.ndarray | None
    uncertainty: np.ndarray | None
    uncertainty_label: str
    origin: str | None
    step: str

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.labels, self.before, self.probs, self.uncertainty) if a is not None)


@dataclass
class Work:
    """One image and what was done to it.

    ``image``: (H, W, 3) uint8 for 8-bit files, uint16 for 16-bit ones, float32 otherwise.
    ``labels``: the current class map (H, W), what Save stores. ``before``: labels before the
    last refinement, correction or undo (for the before/after view). ``probs``: class
    probabilities (C, H, W) float16 while ``labels`` are the untouched segmentation of a small
    enough image, else None. ``uncertainty``: (H, W) float16 in [0, 1], described by
    ``uncertainty_label``. ``origin``: store origin of ``labels`` ("predicted", "refined",
    "corrected"). ``pair_id``: the store pair saved last from this image (what Undo last save
    goes back on). ``segmentation``: the last segmentation as it came from the model (what
    Refine starts from while the labels are only its refinement, and what "Back to the
    segmentation" restores). ``history``: states before each later change, newest last (Undo).
    """

    name: str
    image: np.ndarray
    path: Path | None
    outdir: Path
    notes: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None
    before: np.ndarray | None = None
    probs: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_label: str = SEGMENTER_UNCERTAINTY
    model_key: str | None = None
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    working_size: tuple[int, int] | None = None
    origin: str | None = None
    pair_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    segmentation: LabelState | None = None
    history: list[LabelState] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def state(self, step: str) -> LabelState:
        """The current labels and what goes with them, as ``step`` is about to change them."""
        return LabelState(self.labels, self.before, self.probs, self.uncertainty, self.uncertainty_label,
                          self.origin, step)

    def remember(self, step: str) -> None:
        """Keep the current state for Undo before ``step`` changes it (the oldest go first when
        more than :data:`HISTORY_STEPS` or :data:`HISTORY_BYTES`)."""
        if self.labels is None:
            return
        self.history.append(self.state(step))
        while len(self.history) > HISTORY_STEPS or (len(self.history) > 1 and self._history_bytes() > HISTORY_BYTES):
            self.history.pop(0)

    def restore(self, state: LabelState) -> None:
        self.labels, self.before, self.probs = state.labels, state.before, state.probs
        self.uncertainty, self.uncertainty_label, self.origin = state.uncertainty, state.uncertainty_label, state.origin

    def _history_bytes(self) -> int:
        seen: dict[int, int] = {}
        for state in self.history:
            for a in (state.labels, state.before, state.probs, state.uncertainty):
                if a is not None:
                    seen[id(a)] = a.nbytes
        return sum(seen.values())

    def class_order(self) -> list[int]:
        """Class ids in the legend's order (present classes first, largest first)."""
        return class_order(self.labels, len(self.classes))

    def summary(self) -> dict[str, Any]:
        """What the API returns about the current state (JSON-ready)."""
        info: dict[str, Any] = {
            "image": self.name, "height": self.shape[0], "width": self.shape[1], "notes": list(self.notes),
            "model": self.model_key, "origin": self.origin, "pair_id": self.pair_id,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.working_size is not None:
            info["working_size"] = list(self.working_size)
        if self.labels is not None:
            shares = class_shares(self.labels, len(self.classes))
            info["classes"] = {self.class_name(i): round(100 * float(s), 2) for i, s in enumerate(shares) if s > 0}
        return info

    def class_name(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else f"class {i}"


# --------------------------------------------------------------------------------------------


class Workbench:
    """Server-wide state and the operations behind every button and API endpoint.

    ``model``, ``refiner``, ``store`` override the config's (tests pass tiny models). The default
    segmentation model is loaded at once (an error if it cannot be); a missing refiner is
    reported in ``refiner_problem`` and Refine then explains it. Models are named by their
    catalog key (never by a server path: clients must not make the server load other folders).
    """

    def __init__(self, config: WebConfig | None = None, *, model: str | Path | None = None,
                 refiner: str | Path | None = None, store: str | Path | Store | None = None):
        self.config = config = dataclasses.replace(config or WebConfig())
        if model is not None:
            config.model = model
        if refiner is not None:
            config.refiner = refiner
        if store is not None:
            config.store = store.root if isinstance(store, Store) else Path(store)
        self.store = store if isinstance(store, Store) else Store.open(Path(config.store).expanduser())
        self.catalog = ModelCatalog(self.store.root, [config.model, config.refiner], device=config.device)
        self.default_model = self.catalog.find(config.model, "segmentation").key
        self.catalog.load(self.catalog.entry(self.default_model, "segmentation"))
        self.default_refiner: str | None = None
        self.refiner_problem: str | None = None
        try:
            self.default_refiner = self.catalog.find(config.refiner, "refinement").key
            self.catalog.load(self.catalog.entry(self.default_refiner, "refinement"))
        except FineMaskError as exc:
            self.default_refiner = None
            self.refiner_problem = (f"no refinement model available: {exc}. Segmentation, correction and "
                                    "saving work without it.")
        self.outdir = Path(tempfile.mkdtemp(prefix="finemask-web-"))  # files offered for download

    @property
    def registry(self) -> ModelCatalog:
        """The model catalog (its former name)."""
        return self.catalog

    def close(self) -> None:
        shutil.rmtree(self.outdir, ignore_errors=True)

    # ---------------------------------------------------------------- choices for the page

    def model_choices(self, task: str = "segmentation") -> list[tuple[str, str]]:
        """(label, key) pairs for a dropdown."""
        return [(e.label, e.key) for e in self.catalog.entries(task)]

    def model_working_size(self, key: str | None) -> int:
        """The working size (longer side, px) a segmentation model was trained for."""
        try:
            card = self.catalog.entry(key or self.default_model, "segmentation").card
        except FineMaskError:
            return 480
        return int(max(card.input_size or [480, 360])) if card is not None else 480

    def store_summary(self) -> str:
        train, val = len(self.store.pairs("train")), len(self.store.pairs("validation"))
        return f"Annotation store: {train} training and {val} validation pairs in `{self.store.root}`"

    def segmenter_for(self, key: str | None) -> Segmenter:
        return self.catalog.load(self.catalog.entry(key or self.default_model, "segmentation"))

    def refiner_for(self, key: str | None) -> Refiner:
        """The Refiner for ``key`` (None: the default); a clear error when none is installed."""
        if not key:
            if self.default_refiner is None:
                raise FineMaskError(self.refiner_problem or "no refinement model available")
            key = self.default_refiner
        return self.catalog.load(self.catalog.entry(key, "refinement"))

    # ---------------------------------------------------------------- operations

    def open_image(self, path: str | Path, name: str | None = None, on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> Work:
        """Check and read an uploaded image file; problems are FineMaskErrors naming the file."""
        limit = self.config.pixel_limit()
        try:
            opened = workbench.open_image(path, max_pixels=limit, name=name, on_progress=on_progress, cancel=cancel)
        except FineMaskError as exc:
            raise self._pixel_limit_error(exc, path, limit) or exc from None
        outdir = self.outdir / uuid.uuid4().hex[:12]
        outdir.mkdir(parents=True, exist_ok=True)
        return Work(name=opened.name, image=opened.image, path=opened.path, outdir=outdir, notes=opened.notes)

    @staticmethod
    def _pixel_limit_error(exc: FineMaskError, path: str | Path, limit: int) -> FineMaskError | None:
        """The refusal of an image over the pixel limit, saying how this server's limit is raised
        (None when ``exc`` is about something else)."""
        try:
            H, W = image_shape(path, max_pixels=1 << 62)
        except Exception:  # noqa: BLE001 - any other problem: the original refusal stands
            return None
        if H * W <= limit:
            return None
        return FineMaskError(f"image has {H * W:,} pixels, more than the limit of {limit:,} pixels of this server; "
                             f"whoever runs it can raise the limit: python -m app.web --max-pixels {H * W} "
                             "(or FINEMASK_MAX_PIXELS)", exc.path)

    def segment(self, work: Work, model: str | None = None, working_size: int | None = None,
                on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Work:
        """Segment ``work.image`` with a segmentation model; replaces the labels (Undo goes back)."""
        entry = self.catalog.entry(model or self.default_model, "segmentation")
        if on_progress is not None:
            on_progress(0, 1, f"loading the model {entry.key}")
        seg = workbench.segment(self.catalog.load(entry), work.image, working_size, on_progress=on_progress,
                                cancel=cancel)
        work.remember("segment")
        work.seconds = dict(seg.seconds)
        work.labels, work.before, work.probs = seg.labels, None, seg.probs
        work.uncertainty = seg.uncertainty.astype(np.float16)  # half the memory of float32, for display only
        work.uncertainty_label = SEGMENTER_UNCERTAINTY
        work.model_key = entry.key
        work.classes, work.palette = seg.classes, seg.palette
        work.working_size = seg.working_size
        work.origin = "predicted"
        work.segmentation = work.state("segment")
        return work

    def refine(self, work: Work, refiner: str | None = None, mode: str = DEFAULT_MODE,
               on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Work:
        """Refine at full resolution (``mode``: see ``engine.refine_modes``).

        While the labels are the last segmentation or only its refinement, the segmentation is
        refined (a second Refine tries another mode; it does not refine a refinement); corrected
        or loaded labels are refined as they are.
        """
        if work.labels is None:
            raise FineMaskError("nothing to refine yet: segment the image (or load labels) first")
        model = self.refiner_for(refiner)
        source = work.state("refine")
        if work.origin == "refined" and work.segmentation is not None:
            source = work.segmentation
        # The web page shows the refined uncertainty map; napari shows it for segmentations only.
        result = workbench.refine(model, work.image, source.labels, source.probs, mode=mode, uncertainty=True,
                                  on_progress=on_progress, cancel=cancel)
        work.remember("refine")
        work.seconds["refine"] = result.seconds["refine"]
        work.before, work.labels, work.probs = source.labels, result.labels, None
        work.uncertainty = result.uncertainty.astype(np.float16)
        work.uncertainty_label = REFINER_UNCERTAINTY
        work.origin = "corrected" if source.origin == "corrected" else "refined"
        return work

    def refines_segmentation(self, work: Work) -> bool:
        """Whether Refine starts from the segmentation (not from corrected or loaded labels)."""
        return work.segmentation is not None and work.origin in ("predicted", "refined")

    def set_labels(self, work: Work, labels_path: str | Path, model: str | None = None) -> Work:
        """Use a label file (TIFF or palette PNG of the image's size) as the current labels.

        Class names and colours come from ``model`` (default: the default segmentation model).
        """
        entry = self.catalog.entry(model or self.default_model, "segmentation")
        labels = read_labels(labels_path, shape=work.shape, max_pixels=self.config.pixel_limit())
        work.remember("load labels")
        work.labels, work.before, work.probs, work.uncertainty = labels, None, None, None
        work.model_key = entry.key
        card = entry.card
        work.classes = list(card.classes) if card is not None else []
        work.palette = [list(c) for c in card.palette] if card is not None else []
        work.origin = "corrected"
        return work

    def editor_shape(self, work: Work) -> tuple[int, int]:
        """(h, w) of the image in the browser editor (a preview when the image is large)."""
        return fit_size(*work.shape, self.config.editor_max_side)

    def brush_colours(self, work: Work) -> list[tuple[int, int, int]]:
        """One brush colour per class id (what painted colours are mapped back with)."""
        return brush_colours(work.palette, max(len(work.classes), 1))

    def brush_palette(self, work: Work) -> list[tuple[str, tuple[int, int, int]]]:
        """(class name, brush colour) in the legend's order: the editor's swatches."""
        colours = self.brush_colours(work)
        return [(work.class_name(i), colours[i]) for i in work.class_order() if i < len(colours)]

    def apply_edit(self, work: Work, layers: list[np.ndarray], on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> EditResult:
        """Apply editor layers (RGBA at editor size) to the labels; a preview's strokes are
        snapped to the image's edges at full resolution."""
        if work.labels is None:
            raise FineMaskError("nothing to correct yet: segment the image first")
        strokes = strokes_from_layers(layers, self.brush_colours(work), self.editor_shape(work))
        result = workbench.apply_edit(work.labels, strokes, work.image, on_progress=on_progress, cancel=cancel)
        if result.changed:
            work.remember("correction")
            work.before, work.labels = work.labels, result.labels
            work.probs = None
            work.origin = "corrected"
        return result

    def undo_change(self, work: Work) -> str:
        """Go back one labels change of this image (refine, correction, ...); returns the step undone."""
        if not work.history:
            raise FineMaskError("nothing to undo: no refinement or correction since the image was segmented")
        state = work.history.pop()
        work.restore(state)
        return state.step

    def back_to_segmentation(self, work: Work) -> Work:
        """The labels of the last segmentation again (Undo goes back to what was there)."""
        if work.segmentation is None:
            raise FineMaskError("no segmentation of this image yet: press Segment first")
        if work.labels is work.segmentation.labels:
            raise FineMaskError("the labels already are the segmentation")
        work.remember("back to the segmentation")
        current = work.labels
        work.restore(work.segmentation)
        work.before = current
        return work

    def save(self, work: Work, on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> PairRecord:
        """Add the image and its current labels to the store, or update the pair saved before."""
        if work.labels is None:
            raise FineMaskError("nothing to save yet: segment the image first")
        # The uploaded file's bytes are kept as they are (its name, as uploaded, names the pair).
        outcome = workbench.save_to_store(self.store, work.image, work.labels, work.classes, pair_id=work.pair_id,
                                          image_file=work.path, origin=work.origin or "corrected",
                                          model_version=work.model_key, name=work.name, on_progress=on_progress,
                                          cancel=cancel)
        work.pair_id = outcome.pair_id
        return outcome.record

    def undo(self, work: Work, on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> PairRecord:
        """Undo the last save of this image: the store pair and the labels go back one version."""
        outcome = workbench.undo_last_save(self.store, work.pair_id, on_progress=on_progress, cancel=cancel)
        labels = outcome.labels
        if work.labels is not None and labels.size and int(labels.max()) <= np.iinfo(work.labels.dtype).max:
            labels = labels.astype(work.labels.dtype, copy=False)
        work.remember("undo of the last save")
        work.before, work.labels, work.probs, work.uncertainty = work.labels, labels, None, None
        work.origin = outcome.record.origin
        return outcome.record

    def undo_pair(self, pair_id: str, on_progress: ProgressFn | None = None,
                  cancel: CancelFn | None = None) -> PairRecord:
        """Undo the last save of the store pair ``pair_id`` (the API's ``/undo``)."""
        return workbench.undo_last_save(self.store, pair_id, on_progress=on_progress, cancel=cancel).record

    def export(self, work: Work) -> list[Path]:
        """Write the current labels as TIFF (and palette PNG when ids fit in 8 bits) for download."""
        if work.labels is None:
            return []
        tif = write_labels(work.outdir / f"{work.name}_labels.tif", work.labels)
        if int(work.labels.max()) > 255:
            return [tif]
        png = write_labels(work.outdir / f"{work.name}_labels.png", work.labels, palette=work.palette)
        return [tif, png]

    def finetune(self, base: str | None, steps: int | None = None, minutes: float | None = None,
                 on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> FinetuneResult:
        """Fine-tune ``base`` (any model key) on the store (the step budget and minutes override the
        config's); a cancelled run raises ``workbench.FinetuneCancelled`` and resumes when started again."""
        entry = self.catalog.entry(base or self.default_model)
        return workbench.finetune(self.store, entry.path or entry.source, self.config.finetune, steps=steps,
                                  time_budget_s=float(minutes) * 60.0 if minutes else None,
                                  on_progress=on_progress, cancel=cancel)


__all__ = [
    "HISTORY_STEPS",
    "MIN_SIDE",
    "REFINER_UNCERTAINTY",
    "SEGMENTER_UNCERTAINTY",
    "LabelState",
    "ModelEntry",
    "WebConfig",
    "Work",
    "Workbench",
    "bundled_examples",
    "default_store_dir",
    "inspect_header",
]
