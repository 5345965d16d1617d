"""The jobs a person runs, the same behind napari, the web page and the web API.

Open an image, segment, refine (mode), apply an edit, save to the annotation store, undo the last
save, fine-tune. Each takes ``on_progress(done, total, message)`` and ``cancel()`` (checked
before any write and between steps) and raises ``engine.errors.Cancelled`` when cancelled;
problems a user can fix are one ``FineMaskError``. Labels here are class ids (H, W), with
:data:`UNLABELLED` (255) for pixels nobody labelled; front ends convert their own
representation (napari shows ``class + 1``) at their edge.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import Cancelled, FineMaskError
from engine.hashing import file_sha256
from engine.io import default_palette, image_shape, read_labels
from engine.pipeline import check_cancel, refine_step, segment_step
from engine.refine_modes import DEFAULT_MODE, mode_options
from engine.store import UNLABELLED, PairRecord, Store, check_class_ids

from .images import OpenedImage
from .images import open_image as _open_image

if TYPE_CHECKING:
    from app.web.editor import EditResult
    from engine.refine import Refiner
    from engine.segment import Segmenter
    from training.finetune import FinetuneConfig, FinetuneResult

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

#: Working sizes (longer side, px) a person may choose; 0/None means the model's own.
WORKING_SIZE_RANGE = (32, 4096)
#: Class probabilities are kept for the refiner only up to this size; bigger images refine
#: without them (each class then competes against a fixed 0.5, as in CascadePSP).
KEEP_PROBS_BYTES = 256 << 20


def _report(on_progress: ProgressFn | None, done: int, total: int, message: str) -> None:
    if on_progress is not None:
        on_progress(done, total, message)


def _cancellable(on_progress: ProgressFn | None, cancel: CancelFn | None, what: str) -> ProgressFn | None:
    """``on_progress`` that also checks ``cancel`` at every report, so a long step that reports
    progress (the segmenter's upsampling in row strips) stops at its next report."""
    if cancel is None:
        return on_progress

    def report(done: int, total: int, message: str) -> None:
        check_cancel(cancel, what)
        _report(on_progress, done, total, message)

    return report


# ------------------------------------------------------------------ open


def open_image(path: str | Path, *, max_pixels: int | None = None, name: str | None = None,
               on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> OpenedImage:
    """Read an image file for the jobs (``app.workbench.images.open_image``)."""
    check_cancel(cancel, "opening the image")
    _report(on_progress, 0, 1, f"reading {name or Path(path).name}")
    opened = _open_image(path, max_pixels=max_pixels, name=name)
    _report(on_progress, 1, 1, "read")
    return opened


# ------------------------------------------------------------------ segment


@dataclass
class Segmentation:
    """A segmentation at full size.

    ``labels``: (H, W) class ids. ``probs``: (C, H, W) float16 class probabilities, or None when
    larger than :data:`KEEP_PROBS_BYTES`. ``uncertainty``: (H, W) float32, 1 - top probability.
    ``working_size``: (h, w) the model saw.
    """

    labels: np.ndarray
    probs: np.ndarray | None
    uncertainty: np.ndarray
    classes: list[str]
    palette: list[list[int]]
    model_name: str
    working_size: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)


def check_working_size(working_size: int | None) -> int | None:
    """None for the model's own size (None or 0), else a size inside :data:`WORKING_SIZE_RANGE`."""
    if not working_size:
        return None
    lo, hi = WORKING_SIZE_RANGE
    if not lo <= int(working_size) <= hi:
        raise FineMaskError(f"working size must lie in {lo}..{hi} pixels, got {working_size}")
    return int(working_size)


def segment(segmenter: Segmenter, image: np.ndarray, working_size: int | None = None, *,
            on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Segmentation:
    """Segment ``image`` at ``working_size`` (longer side, px; None or 0: the model's)."""
    size = check_working_size(working_size)
    name = segmenter.card.name
    _report(on_progress, 0, 1, f"segmenting with {name}")
    t0 = time.perf_counter()
    result = segment_step(segmenter, image, size, on_progress=_cancellable(on_progress, cancel, "segmentation"),
                          cancel=cancel)
    classes = list(segmenter.classes)
    palette = [list(map(int, c)) for c in segmenter.palette]
    if len(palette) < len(classes):  # a card with fewer colours than classes
        palette += [list(map(int, c)) for c in default_palette(len(classes))[len(palette):len(classes)]]
    probs = result.probs if result.probs.nbytes <= KEEP_PROBS_BYTES else None
    seg = Segmentation(labels=result.labels, probs=probs, uncertainty=result.uncertainty, classes=classes,
                       palette=palette, model_name=name, working_size=tuple(result.working_size),
                       seconds={"segment": time.perf_counter() - t0})
    _report(on_progress, 1, 1, f"segmented with {name}")  # the engine's steps above, the job done here
    return seg


# ------------------------------------------------------------------ refine


@dataclass
class Refinement:
    """``labels``: refined (H, W), same dtype as the input; ``changed``: bool (H, W);
    ``uncertainty``: 1 - the winning class's confidence (float32), when asked for."""

    labels: np.ndarray
    changed: np.ndarray
    uncertainty: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def changed_fraction(self) -> float:
        return float(self.changed.mean()) if self.changed.size else 0.0


def refine(refiner: Refiner, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None, *,
           mode: str = DEFAULT_MODE, uncertainty: bool = False, on_progress: ProgressFn | None = None,
           cancel: CancelFn | None = None) -> Refinement:
    """Refine a label map at full resolution in ``mode`` ("full", "fast", "local").

    Every value is a region. ``probs`` (C, H, W) from the segmentation that made ``labels`` serve
    as the coarse confidence when they fit (callers pass them only while the labels are that
    segmentation, untouched). ``uncertainty``: also return 1 - confidence.
    """
    mode_options(mode)  # an unknown mode is refused before any work
    labels = np.asarray(labels)
    image_hw = tuple(np.asarray(image).shape[:2])
    if labels.ndim != 2:
        raise FineMaskError(f"labels must be a 2-D map, found shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise FineMaskError(f"labels must hold whole numbers, found {labels.dtype}")
    if tuple(labels.shape) != image_hw:
        raise FineMaskError(f"the labels are {labels.shape[0]}x{labels.shape[1]} (HxW) but the image is "
                            f"{image_hw[0]}x{image_hw[1]}: choose the image they belong to")
    _report(on_progress, 0, 1, f"refining ({mode})")
    work = labels if labels.dtype.kind in "ub" else labels.astype(np.int64)
    t0 = time.perf_counter()
    out = refine_step(refiner, image, work, probs, mode=mode, confidence=uncertainty, on_progress=on_progress,
                      cancel=cancel)
    seconds = {"refine": time.perf_counter() - t0}
    stats = getattr(refiner, "stats", None)
    for step in ("global", "local"):
        value = getattr(stats, f"{step}_seconds", None)
        if isinstance(value, (int, float)):
            seconds[step] = float(value)
    refined = out.labels.astype(labels.dtype, copy=False)
    unsure = None if out.confidence is None else (1.0 - out.confidence).astype(np.float32)
    return Refinement(labels=refined, changed=refined != labels, uncertainty=unsure, seconds=seconds)


# ------------------------------------------------------------------ edit


def apply_edit(labels: np.ndarray, strokes: np.ndarray, image: np.ndarray | None = None, *,
               on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> EditResult:
    """Apply painted strokes (class ids, -1 = unpainted) to ``labels``.

    Strokes at the labels' size replace the painted pixels. Strokes on a smaller preview are
    upsampled and, with the ``image``, their outlines snapped to the image's edges at full
    resolution (``app.web.editor.apply_strokes``, UI-free, no model). napari users paint the
    full-size layer directly, so there only the first case occurs.
    """
    from app.web.editor import apply_strokes

    check_cancel(cancel, "applying the correction")
    _report(on_progress, 0, 1, "applying the correction")
    return apply_strokes(labels, np.asarray(strokes), image, on_progress=on_progress, cancel=cancel)


# ------------------------------------------------------------------ store


def class_mismatch_message(store_names: Sequence[str], label_names: Sequence[str]) -> str:
    """The one message for labels whose class names are not the store's (both front ends)."""
    def shown(names: Sequence[str]) -> str:
        return ", ".join(names[:12]) + (f", … ({len(names)} classes)" if len(names) > 12 else "")

    return (f"this store's classes are {shown(store_names)}; the labels use {shown(label_names)}. "
            "Save them to another store folder, one for this model's classes")


def check_store_classes(store: Store, names: Sequence[str]) -> None:
    """Refuse labels named by other classes than the store's (one list must start the other:
    a store may name classes a fine-tuning run adds, and a fine-tuned model extends its base's)."""
    current = store.class_names
    if current is None:
        return
    n = min(len(current), len(names))
    if list(current[:n]) != list(names[:n]) or n == 0:
        raise FineMaskError(class_mismatch_message(current, list(names)), store.root)


def pair_for_file(store: Store, path: str | Path | None) -> str | None:
    """The id of the store pair whose image has the same bytes as the file ``path`` (None if none)."""
    if path is None or not Path(path).is_file():
        return None
    sha = file_sha256(path)
    return next((rec.id for rec in store.pairs() if rec.image_sha256 == sha), None)


@dataclass
class SaveOutcome:
    """``record``: the pair as stored; ``created``: a new pair (else a new labels version);
    ``versions``: earlier labels versions the pair has (what Undo can go back to)."""

    record: PairRecord
    created: bool

    @property
    def pair_id(self) -> str:
        return self.record.id

    @property
    def versions(self) -> int:
        return self.record.history_length


def save_to_store(store: Store, image: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                  pair_id: str | None = None, image_file: str | Path | None = None, origin: str = "corrected",
                  model_version: str | None = None, name: str | None = None,
                  on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> SaveOutcome:
    """Write ``image`` and its ``labels`` (class ids named by ``classes``) to ``store``.

    Refused before anything is written: class names other than the store's
    (:func:`class_mismatch_message`), and ids ``classes`` does not name (except UNLABELLED).
    A store without class names takes ``classes``. The pair ``pair_id`` (when in the store) or
    the pair of the same image file is updated (a new labels version); otherwise a pair is added:
    the file's bytes are copied when ``image_file`` matches the labels' size, else the array is
    written under the id ``name`` (made file-safe and unique).
    """
    check_cancel(cancel, "saving")
    _report(on_progress, 0, 1, "saving")
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise FineMaskError(f"labels must be a 2-D map of class ids, found {labels.dtype} {labels.shape}")
    names = [str(c) for c in classes]
    if not names:
        raise FineMaskError("these labels have no class names: choose the segmentation model they come from")
    check_store_classes(store, names)
    present = np.flatnonzero(np.bincount(labels.reshape(-1).astype(np.int64, copy=False))) if labels.size else []
    where = Path(image_file) if image_file is not None else Path(name or "labels")
    check_class_ids(present, store.class_names or names, where)
    if store.class_names is None:
        store.set_class_names(names)
    if pair_id is None or pair_id not in store:
        pair_id = pair_for_file(store, image_file)
    check_cancel(cancel, "saving")
    if pair_id is not None:
        record = store.update(pair_id, labels, origin=origin, model_version=model_version)
        created = False
    else:
        source: np.ndarray | Path = image
        if image_file is not None and Path(image_file).is_file():
            try:
                if image_shape(image_file) == tuple(labels.shape):
                    source = Path(image_file)
            except FineMaskError:
                pass
        new_id = store.add(source, labels, origin, model_version=model_version,
                           name=_free_id(store, name) if name and not isinstance(source, Path) else None)
        record, created = store.get(new_id), True
    _report(on_progress, 1, 1, f"saved {record.id}")
    return SaveOutcome(record, created)


def _free_id(store: Store, name: str) -> str | None:
    """A file-safe pair id from a name, not yet taken (None: let the store choose)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:72]
    if not base:
        return None
    taken = {i.lower() for i in store.ids()}
    candidate, n = base, 2
    while candidate.lower() in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


@dataclass
class UndoOutcome:
    """The pair after going back one version, and its labels (class ids) as now stored."""

    record: PairRecord
    labels: np.ndarray


def undo_last_save(store: Store, pair_id: str | None, *, on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> UndoOutcome:
    """Go back to the previous labels version of ``pair_id`` (the pair saved last)."""
    if pair_id is None or pair_id not in store:
        raise FineMaskError("nothing from this image was saved to the open store yet", store.root)
    check_cancel(cancel, "undo")
    _report(on_progress, 0, 1, "undoing the last save")
    record = store.undo(pair_id)
    labels = read_labels(record.labels_path, shape=record.shape)
    _report(on_progress, 1, 1, f"{pair_id}: back to the previous version")
    return UndoOutcome(record, labels)


# ------------------------------------------------------------------ fine-tune


class FinetuneCancelled(Cancelled):
    """Fine-tuning stopped by ``cancel()``; its state is kept and the same run resumes it."""

    def __init__(self, steps: int, run_dir: Path | None, before: dict | None = None):
        super().__init__(f"fine-tuning cancelled after {steps} steps; starting it again with the same "
                         "settings continues it")
        self.steps = steps
        self.run_dir = run_dir
        self.before = dict(before or {})  # the base model's scores, evaluated before training


def finetune(store: Store, base: str | Path, config: FinetuneConfig | None = None, *, steps: int | None = None,
             time_budget_s: float | None = None, on_progress: ProgressFn | None = None,
             cancel: CancelFn | None = None) -> FinetuneResult:
    """Fine-tune ``base`` (name or folder) on ``store`` (``training.finetune``); a new version
    appears in ``<store>/models``. ``steps``/``time_budget_s`` override ``config``'s. Unlabelled
    pixels (255) are never trained on. Raises :class:`FinetuneCancelled` when cancelled."""
    from training.finetune import FinetuneConfig
    from training.finetune import finetune as run

    cfg = dataclasses.replace(config) if config is not None else FinetuneConfig()
    if steps is not None:
        if int(steps) < 1:
            raise FineMaskError(f"the step budget must be at least 1, got {steps}")
        cfg.steps = int(steps)
    if time_budget_s:
        cfg.time_budget_s = float(time_budget_s)
    cfg.ignore_index = UNLABELLED  # both front ends store unlabelled pixels as 255
    check_cancel(cancel, "fine-tuning")
    result = run(store, base, cfg, on_progress=on_progress, cancel=cancel)
    if not result.finished:
        raise FinetuneCancelled(result.steps, result.run_dir, result.before)
    return result


__all__ = ["KEEP_PROBS_BYTES", "UNLABELLED", "WORKING_SIZE_RANGE", "FinetuneCancelled", "Refinement",
           "SaveOutcome", "Segmentation", "UndoOutcome", "apply_edit", "check_store_classes", "check_working_size",
           "class_mismatch_message", "file_sha256", "finetune", "open_image", "pair_for_file", "refine",
           "save_to_store", "segment", "undo_last_save"]
