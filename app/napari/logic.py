"""What the napari plugin does, without any UI: model lists, layer <-> engine conversion, jobs.

Nothing here imports napari or Qt, so every rule can be unit tested and reused; the dock widget
(``widget.py``) only calls these functions from a worker thread and shows their results.

Label values. napari treats label 0 as "no label" (transparent; the eraser paints it), while
model class 0 is a real class (e.g. Sky). A FineMask Labels layer therefore holds
``class id + 1``; value 0 means *unlabelled*. On the way back (store, writer) unlabelled pixels
become :data:`UNLABELLED` (255), which fine-tuning ignores. So users paint classes with napari's
own tools, erase to mark "not sure, do not train on this", and every class stays visible.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.checkpoints import CARD_FILE, ModelCard, available_models, read_card, resolve
from engine.errors import Cancelled, FineMaskError
from engine.refine_modes import mode_options

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

#: Class id stored for pixels left unlabelled (napari value 0); fine-tuning ignores it.
UNLABELLED = 255
#: Most classes a model may have here (ids 0..254; 255 is UNLABELLED).
MAX_CLASSES = 255
DEFAULT_SEGMENTER = "camvid"
DEFAULT_REFINER = "refine-light"
#: Colour of label values that are no class of the model (e.g. napari's "new label").
UNKNOWN_COLOUR = (1.0, 0.0, 1.0, 1.0)
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


class JobCancelled(Exception):
    """A job stopped because the user pressed Cancel."""


# ------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelChoice:
    """A model the user can pick: ``source`` is what ``from_pretrained`` takes.

    ``origin``: "shipped" (assets/models), "store" (fine-tuned, in <store>/models) or "folder"
    (added by hand). ``available`` is False for a default that is not installed.
    """

    source: str
    name: str
    task: str
    origin: str
    card: ModelCard | None
    available: bool = True

    @property
    def label(self) -> str:
        if not self.available:
            return f"{self.name} (not installed)"
        kind = {"shipped": "shipped", "store": "fine-tuned", "folder": "folder"}[self.origin]
        summary = metrics_summary(self.card) if self.card is not None else ""
        return f"{self.name} · {kind}" + (f" · {summary}" if summary else "")


def list_models(
    task: str,
    store_root: str | Path | None = None,
    extra_folders: Iterable[str | Path] = (),
    default: str | None = None,
) -> list[ModelChoice]:
    """Models of ``task`` ("segmentation" or "refinement"): shipped, then the store's, then extras.

    Fine-tuned versions come from ``training.finetune.list_versions`` (oldest first). A
    ``default`` name that is not installed is listed as unavailable, so the UI can say so.
    Unreadable folders are skipped (they are not the user's current concern).
    """
    found: list[ModelChoice] = []
    for name in available_models():
        card = _card_or_none(name)
        if card is not None and card.task == task:
            found.append(ModelChoice(name, card.name or name, task, "shipped", card))
    if store_root is not None and Path(store_root).is_dir():
        from training.finetune import list_versions

        for name, folder, card in list_versions(store_root):
            if card.task == task:
                found.append(ModelChoice(str(folder), name, task, "store", card))
    known = {str(Path(c.source).resolve()) for c in found if c.origin != "shipped"}
    for folder in extra_folders:
        card = _card_or_none(folder)
        if card is not None and card.task == task and str(Path(folder).resolve()) not in known:
            known.add(str(Path(folder).resolve()))
            found.append(ModelChoice(str(folder), card.name, task, "folder", card))
    if default is not None and not any(c.source == default for c in found):
        found.insert(0, ModelChoice(default, default, task, "shipped", None, available=False))
    return found


def _card_or_none(name_or_path: str | Path) -> ModelCard | None:
    try:
        return read_card(name_or_path)
    except FineMaskError:
        return None


def _percent(value: Any, scaled: bool) -> float | None:
    """A metric as a percentage; ``scaled`` values are already 0-100, others may be fractions."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if scaled or value > 1.0 else 100.0 * float(value)


def metrics_summary(card: ModelCard) -> str:
    """One short line: "mIoU 23.3" for a shipped card, "mIoU 23.3 → 31.0" for a fine-tuned one.

    Fine-tuned cards hold ``{"before": {...}, "after": {...}}`` with mIoU in 0-100 (the
    fine-tuning contract); other cards hold named evaluations whose mIoU may be a fraction.
    """
    metrics = card.metrics or {}
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        b, a = _percent(before.get("miou"), True), _percent(after.get("miou"), True)
        if b is not None and a is not None:
            return f"mIoU {b:.1f} → {a:.1f}"
        return ""
    for value in metrics.values():
        if isinstance(value, dict) and _percent(value.get("miou"), False) is not None:
            return f"mIoU {_percent(value['miou'], False):.1f}"
    return ""


def metrics_details(card: ModelCard | None) -> str:
    """A few lines describing a model card for the Model section."""
    if card is None:
        return "not installed"
    lines = [f"{card.name}: {card.task}" + (f", {len(card.classes)} classes" if card.classes else "")]
    metrics = card.metrics or {}
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        lines.append(evaluation_line(before, after))
    else:
        for key, value in metrics.items():
            if isinstance(value, dict):
                parts = [f"{label} {_percent(value.get(k), False):.1f}" for k, label in
                         (("miou", "mIoU"), ("mba", "mBA"), ("pixel_accuracy", "pixel acc."))
                         if _percent(value.get(k), False) is not None]
                if parts:
                    lines.append(f"{key}: " + ", ".join(parts))
    if card.parent:
        lines.append(f"fine-tuned from {Path(str(card.parent)).name}")
    return "\n".join(lines)


def evaluation_line(before: dict, after: dict) -> str:
    """Before/after metrics of a fine-tuning run (contract: mIoU and mBA in 0-100)."""
    pairs = int(after.get("pairs", before.get("pairs", 0)) or 0)
    if pairs == 0:
        return "no validation pairs yet: the store puts about 1 pair in 5 aside for validation"
    parts = []
    for key, label in (("miou", "mIoU"), ("mba", "mBA")):
        b, a = _percent(before.get(key), True), _percent(after.get(key), True)
        if b is not None and a is not None:
            parts.append(f"{label} {b:.1f} → {a:.1f}")
    return ", ".join(parts) + f" on {pairs} validation pair{'s' if pairs != 1 else ''}"


class ModelCache:
    """Loaded models by source, reloaded when the card file changes; safe across threads."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def segmenter(self, source: str):
        from engine.segment import Segmenter

        return self._get("segmentation", source, Segmenter.from_pretrained)

    def refiner(self, source: str):
        from engine.refine import Refiner

        return self._get("refinement", source, Refiner.from_pretrained)

    def put(self, task: str, source: str, model: Any) -> None:
        """Use ``model`` for ``source`` (tests inject fakes this way)."""
        with self._lock:
            self._models[(task, source)] = (float("inf"), model)

    def _get(self, task: str, source: str, load: Callable[[str], Any]) -> Any:
        with self._lock:
            cached = self._models.get((task, source))
            if cached is not None and cached[0] == float("inf"):
                return cached[1]
            try:
                stamp = (resolve(source) / CARD_FILE).stat().st_mtime
            except FineMaskError:
                if task == "refinement" and source == DEFAULT_REFINER:
                    raise FineMaskError(
                        f"the default refinement model {DEFAULT_REFINER!r} is not installed; "
                        "add a refiner folder in the Model section (or fine-tune one)"
                    ) from None
                raise
            if cached is not None and cached[0] == stamp:
                return cached[1]
            model = load(source)
            self._models[(task, source)] = (stamp, model)
            return model


# ------------------------------------------------------------------ labels <-> layer values

_TO_LAYER = np.arange(1, 257, dtype=np.uint16)
_TO_LAYER[UNLABELLED] = 0
_TO_LAYER = _TO_LAYER.astype(np.uint8)  # class c -> c + 1 (<= 255); UNLABELLED -> 0


def classes_to_layer(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids (< 255, or UNLABELLED) -> uint8 napari values (class + 1, unlabelled 0)."""
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        if labels.size and int(labels.max()) > UNLABELLED:
            raise FineMaskError(
                f"class id {int(labels.max())} is beyond what the plugin shows (0..{MAX_CLASSES - 1})"
            )
        labels = labels.astype(np.uint8)
    return _TO_LAYER[labels]


def layer_to_classes(values: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """napari values -> uint8 class ids (value - 1; 0 becomes UNLABELLED).

    With ``num_classes``, a value above it (no class of the model) is an error naming it.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise FineMaskError(f"labels must be a 2-D layer, found shape {values.shape}")
    if values.dtype.kind not in "iub":
        raise FineMaskError(f"labels must hold whole numbers, found {values.dtype}")
    hi = int(values.max()) if values.size else 0
    lo = int(values.min()) if values.size else 0
    limit = MAX_CLASSES if num_classes is None else min(int(num_classes), MAX_CLASSES)
    if lo < 0 or hi > limit:
        bad = lo if lo < 0 else hi
        raise FineMaskError(
            f"label {bad} is not a class: use 1..{limit} (0 = unlabelled)"
            + (f"; this model has {num_classes} classes" if num_classes is not None else "")
        )
    out = values.astype(np.uint8) - np.uint8(1)  # 0 wraps round to 255 = UNLABELLED
    return out


def label_colours(palette: Sequence[Sequence[int]]) -> dict[int | None, tuple[float, ...]]:
    """A napari direct colour map: value k + 1 gets class k's colour; 0 is transparent."""
    colours: dict[int | None, tuple[float, ...]] = {None: UNKNOWN_COLOUR, 0: TRANSPARENT}
    for k, rgb in enumerate(palette):
        colours[k + 1] = tuple(float(c) / 255.0 for c in rgb[:3]) + (1.0,)
    return colours


def class_features(classes: Sequence[str]) -> dict[str, list]:
    """Feature table for a Labels layer: napari shows the class name under the cursor."""
    return {"index": list(range(len(classes) + 1)), "class": ["unlabelled", *classes]}


# ------------------------------------------------------------------ images


def image_for_engine(data: Any, rgb: bool, contrast_limits: Sequence[float] | None = None) -> np.ndarray:
    """The pixels of an Image layer as the engine takes them: (H, W) or (H, W, 3/4).

    uint8, uint16, bool and float in [0, 1] pass unchanged (no copy); other types (int32, float
    microscopy data) are scaled to [0, 1] float32 with the layer's contrast limits, which is
    what the user sees.
    """
    arr = np.asarray(data)
    two_d = arr.ndim == 2 or (rgb and arr.ndim == 3 and arr.shape[-1] in (3, 4))
    if not two_d:
        raise FineMaskError(
            f"FineMask works on 2-D grey or RGB images; this layer has shape {arr.shape}. "
            "Take one plane first (e.g. layer.data[0])"
        )
    if arr.dtype in (np.uint8, np.uint16, bool):
        return arr
    if arr.dtype.kind == "f" and arr.size and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
        return arr
    if arr.dtype.kind not in "iuf":
        raise FineMaskError(f"unsupported pixel type {arr.dtype}")
    if contrast_limits:
        lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = (arr.astype(np.float32) - lo) * scale
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0, out=out)


# ------------------------------------------------------------------ jobs


@dataclass
class Segmentation:
    """A segmentation ready for napari.

    values: (H, W) uint8 layer values (class + 1). uncertainty: (H, W) float32 in [0, 1]
    (1 - max class probability). probs: (C, H, W) float16 class probabilities.
    """

    values: np.ndarray
    uncertainty: np.ndarray
    probs: np.ndarray
    classes: list[str]
    palette: list[list[int]]
    model_name: str
    working_size: tuple[int, int]


def segment(segmenter: Any, image: np.ndarray, working_size: int | None = None,
            on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Segmentation:
    """Segment one image with an ``engine.segment.Segmenter`` (working size: longer side, px)."""
    classes = list(segmenter.classes)
    if len(classes) > MAX_CLASSES:
        raise FineMaskError(f"the plugin shows models of up to {MAX_CLASSES} classes; this one has {len(classes)}")
    if cancel is not None and cancel():
        raise JobCancelled("segmentation cancelled")
    try:
        result = segmenter.predict_batch([image], working_size or None, on_progress=on_progress, cancel=cancel)[0]
    except Cancelled:
        raise JobCancelled("segmentation cancelled") from None
    palette = [list(map(int, c)) for c in segmenter.palette]
    if len(palette) < len(classes):
        from engine.io import default_palette

        palette += default_palette(len(classes))[len(palette):len(classes)]
    return Segmentation(values=classes_to_layer(result.labels), uncertainty=result.uncertainty, probs=result.probs,
                        classes=classes, palette=palette, model_name=segmenter.card.name,
                        working_size=tuple(result.working_size))


@dataclass
class Refinement:
    """values: refined (H, W) layer values (same dtype as the input); changed: bool (H, W)."""

    values: np.ndarray
    changed: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def changed_fraction(self) -> float:
        return float(self.changed.mean()) if self.changed.size else 0.0


def refine(refiner: Any, image: np.ndarray, values: np.ndarray, probs: np.ndarray | None = None, *,
           mode: str = "full", on_progress: ProgressFn | None = None,
           cancel: CancelFn | None = None) -> Refinement:
    """Refine any Labels layer's values at full resolution (``engine.refine.Refiner``).

    ``mode``: "full", "fast" or "local" (``engine.refine_modes``).

    Every value is a region, 0 included, so a mask drawn by hand on an empty layer refines like
    a binary mask. ``probs`` (C, H, W) from the segmentation that made the layer are used as the
    coarse confidence when they fit (no unlabelled pixels, every value a class of ``probs``).
    """

    options = mode_options(mode)
    values = np.asarray(values)
    if values.ndim != 2:
        raise FineMaskError(f"labels must be a 2-D layer, found shape {values.shape}")
    if tuple(values.shape) != tuple(np.asarray(image).shape[:2]):
        raise FineMaskError(f"the labels are {values.shape[0]}x{values.shape[1]} (HxW) but the image is "
                            f"{image.shape[0]}x{image.shape[1]}: choose the image they belong to")
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    use_probs = probs is not None and probs.shape[1:] == values.shape and lo >= 1 and hi <= probs.shape[0]
    try:
        if use_probs:
            classes = values.astype(np.uint16) - 1 if values.dtype != np.uint8 else values - np.uint8(1)
            out = refiner.refine_labels(image, classes, probs, **options, on_progress=on_progress, cancel=cancel)
            out = (out + 1).astype(values.dtype)
        else:
            work = values if values.dtype.kind == "u" else values.astype(np.int64)
            out = refiner.refine_labels(image, work, **options, on_progress=on_progress, cancel=cancel)
            out = out.astype(values.dtype, copy=False)
    except Cancelled:
        raise JobCancelled("refinement cancelled") from None
    stats = getattr(refiner, "stats", None)
    seconds = {"global": float(getattr(stats, "global_seconds", 0.0)),
               "local": float(getattr(stats, "local_seconds", 0.0))}
    return Refinement(values=out, changed=out != values, seconds=seconds)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pair_for_file(store: Any, path: str | Path | None) -> str | None:
    """The id of the store pair whose image has the same bytes as ``path`` (None if none)."""
    if path is None or not Path(path).is_file():
        return None
    sha = file_sha256(path)
    for rec in store.pairs():
        if rec.image_sha256 == sha:
            return rec.id
    return None


@dataclass
class SaveOutcome:
    pair_id: str
    created: bool
    versions: int  # earlier labels versions the pair now has (what Undo can go back to)


def save_pair(store: Any, image: np.ndarray, values: np.ndarray, classes: Sequence[str], *,
              pair_id: str | None = None, image_file: str | Path | None = None, origin: str = "corrected",
              model_version: str | None = None, name: str | None = None) -> SaveOutcome:
    """Write the image and its labels to ``store`` (an ``engine.store.Store``).

    The pair is updated when ``pair_id`` is in the store or the store holds the same image file,
    else added (the image file's bytes are copied when ``image_file`` is given and matches the
    layer's size, otherwise the array is written). The store takes the model's class names on
    its first save; a store labelled with other classes is refused.
    """
    labels = layer_to_classes(values, len(classes))
    names = list(classes)
    current = store.class_names
    if current is None:
        store.set_class_names(names)
    elif list(current) != names:
        raise FineMaskError(f"this store's classes are {', '.join(current)}; the labels use {', '.join(names)}. "
                            "Open another store folder for this model", store.root)
    if pair_id is None or pair_id not in store:
        pair_id = pair_for_file(store, image_file)
    if pair_id is not None:
        rec = store.update(pair_id, labels, origin=origin, model_version=model_version)
        return SaveOutcome(pair_id, False, rec.history_length)
    source: Any = image
    if image_file is not None and Path(image_file).is_file():
        from engine.io import image_shape

        try:
            if image_shape(image_file) == tuple(labels.shape):
                source = Path(image_file)
        except FineMaskError:
            pass
    new_id = store.add(source, labels, origin=origin, model_version=model_version,
                       name=_free_id(store, name) if name and source is image else None)
    return SaveOutcome(new_id, True, 0)


def _free_id(store: Any, name: str) -> str | None:
    """A file-safe pair id from a layer name, not yet taken (None: let the store choose)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:72]
    if not base:
        return None
    taken = {i.lower() for i in store.ids()}
    candidate, n = base, 2
    while candidate.lower() in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def undo_pair(store: Any, pair_id: str) -> np.ndarray:
    """Go back to the pair's previous labels version; return it as layer values."""
    from engine.io import read_labels

    rec = store.undo(pair_id)
    return classes_to_layer(read_labels(rec.labels_path, shape=rec.shape))


def finetune(store: Any, base: str, *, steps: int, time_budget_s: float | None = None,
             on_progress: ProgressFn | None = None, cancel: CancelFn | None = None, **options: Any):
    """Fine-tune ``base`` on ``store`` (``training.finetune``); unlabelled pixels are ignored.

    ``options`` are further ``FinetuneConfig`` fields (batch size, crop, ...).
    """
    from training.finetune import FinetuneConfig
    from training.finetune import finetune as run

    config = FinetuneConfig(steps=int(steps), time_budget_s=float(time_budget_s) if time_budget_s else None,
                            ignore_index=UNLABELLED, **options)
    return run(store, base, config, on_progress=on_progress, cancel=cancel)


_LOSS = re.compile(r"loss\s*[=:]?\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")


def parse_loss(message: str) -> float | None:
    """The loss in a progress message such as "train 12/300 · loss 0.41 · ETA 0:43"."""
    match = _LOSS.search(message or "")
    return float(match.group(1)) if match else None


# ------------------------------------------------------------------ settings


def settings_file() -> Path:
    """Where the plugin remembers the store folder: $FINEMASK_CONFIG_DIR or the user config dir."""
    folder = os.environ.get("FINEMASK_CONFIG_DIR")
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("finemask")
    return Path(folder) / "napari.json"


def load_settings() -> dict[str, Any]:
    try:
        data = json.loads(settings_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(**updates: Any) -> None:
    """Merge ``updates`` into the settings file (written atomically)."""
    from engine.atomic import atomic_write_text

    data = load_settings()
    data.update(updates)
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
