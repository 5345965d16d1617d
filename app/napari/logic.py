"""The napari plugin's side of the workbench: layer values <-> class ids, and settings.

The jobs (model lists, segment, refine, save, undo, fine-tune) are ``app.workbench``'s, shared
with the web app; this module only translates napari layers into their inputs and their results
back into layers. Nothing here imports napari or Qt, so every rule is unit tested; the dock
widget (``widget.py``) calls these functions from a worker thread and shows their results.

Label values. napari treats label 0 as "no label" (transparent; the eraser paints it), while
model class 0 is a real class (e.g. Sky). A FineMask Labels layer therefore holds
``class id + 1``; value 0 means *unlabelled*. On the way back (store, writer) unlabelled pixels
become :data:`UNLABELLED` (255), which fine-tuning ignores. So users paint classes with napari's
own tools, erase to mark "not sure, do not train on this", and every class stays visible.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app import workbench
from app.workbench import (  # noqa: F401 - re-exported: what the widget and older callers use
    DEFAULT_SEGMENTER,
    ModelCache,
    ModelEntry,
    SaveOutcome,
    evaluation_line,
    metrics_details,
    metrics_summary,
    pair_for_file,
)
from app.workbench import pixels_for_engine as image_for_engine  # noqa: F401 - the widget's name for it
from app.workbench.jobs import file_sha256  # noqa: F401
from engine.errors import FineMaskError
from engine.store import UNLABELLED

if TYPE_CHECKING:
    from engine.refine import Refiner
    from engine.segment import Segmenter
    from engine.store import Store
    from training.finetune import FinetuneResult

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

#: Most classes a model may have here: layer values are uint8 ``class + 1``, and 255 is UNLABELLED
#: in the store. (The web app keeps class ids as they are and shows any model.)
MAX_CLASSES = 255
#: The refiner offered by default: the official CascadePSP weights once installed, else refine-light.
DEFAULT_REFINER = workbench.default_refiner_name()
#: Colour of label values that are no class of the model (e.g. napari's "new label").
UNKNOWN_COLOUR = (1.0, 0.0, 1.0, 1.0)
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)

#: A model in the plugin's lists (``source`` is what the combo boxes hold).
ModelChoice = ModelEntry


def list_models(task: str, store_root: str | Path | None = None, extra_folders: Iterable[str | Path] = (),
                default: str | None = None) -> list[ModelEntry]:
    """Models of ``task``: shipped, installed, the store's versions, added folders (``ModelCatalog``)."""
    catalog = workbench.ModelCatalog(store_root, [f for f in extra_folders if Path(str(f)).is_dir()])
    return catalog.entries(task, default=default)


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
    return values.astype(np.uint8) - np.uint8(1)  # 0 wraps round to 255 = UNLABELLED


#: Class names drawn transparent: the "nothing here" class of a model (idrid's background would
#: otherwise cover the whole fundus in black).
BACKGROUND_NAMES = frozenset({"background", "void"})


def is_background(name: str) -> bool:
    """Whether a class of this name is drawn transparent (:data:`BACKGROUND_NAMES`)."""
    return str(name).strip().lower() in BACKGROUND_NAMES


def label_colours(palette: Sequence[Sequence[int]],
                  classes: Sequence[str] | None = None) -> dict[int | None, tuple[float, ...]]:
    """A napari direct colour map: value k + 1 gets class k's colour; 0 (unlabelled) and the
    background classes named in ``classes`` are transparent."""
    colours: dict[int | None, tuple[float, ...]] = {None: UNKNOWN_COLOUR, 0: TRANSPARENT}
    for k, rgb in enumerate(palette):
        background = classes is not None and k < len(classes) and is_background(classes[k])
        colours[k + 1] = TRANSPARENT if background else tuple(float(c) / 255.0 for c in rgb[:3]) + (1.0,)
    return colours


def legend_html(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> str:
    """The class legend of the dock: a colour swatch and the name per class (rich text)."""
    import html

    rows = []
    for k, name in enumerate(classes):
        rgb = palette[k] if k < len(palette) else (128, 128, 128)
        colour = "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))
        note = " (not drawn)" if is_background(name) else ""
        rows.append(f'<span style="background-color:{colour}">&nbsp;&nbsp;&nbsp;&nbsp;</span>&nbsp;'
                    f"{html.escape(str(name))}{note}")
    return "<br>".join(rows)


def duration_text(seconds: float) -> str:
    """``seconds`` as "45 s", "12 min" or "2 h 05 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def expected_duration(steps: int, budget_s: float | None, seconds_per_step: float | None) -> str:
    """What a fine-tuning run will take, said before it starts: the time budget and, once a step
    rate was measured on this machine, the steps' estimate (the run stops at whichever comes first)."""
    estimate = steps * seconds_per_step if seconds_per_step else None
    if budget_s:
        if estimate is not None and estimate < budget_s:
            return f"about {duration_text(estimate)} ({steps} steps at {seconds_per_step:.2g} s/step), then evaluation"
        return f"about {duration_text(budget_s)} (the time budget; {steps} steps at most), then evaluation"
    if estimate is not None:
        return f"about {duration_text(estimate)} ({steps} steps at {seconds_per_step:.2g} s/step), then evaluation"
    return (f"{steps} steps with no time limit: the duration is unknown until a run has measured this "
            "machine's speed (minutes to hours); set a time budget")


def finetune_fraction(step: int, total: int, elapsed_s: float | None, budget_s: float | None) -> float:
    """How far a fine-tuning run is (0..1): by steps, or by time when the time budget ends it sooner."""
    fraction = step / total if total else 0.0
    if budget_s and elapsed_s is not None:
        fraction = max(fraction, elapsed_s / budget_s)
    return min(max(fraction, 0.0), 1.0)


def class_features(classes: Sequence[str]) -> dict[str, list]:
    """Feature table for a Labels layer: napari shows the class name under the cursor."""
    return {"index": list(range(len(classes) + 1)), "class": ["unlabelled", *classes]}


# ------------------------------------------------------------------ jobs, in layer values


@dataclass
class Segmentation:
    """A segmentation ready for napari: ``values`` (H, W) uint8 layer values (class + 1),
    ``uncertainty`` (H, W) float32 in [0, 1], ``probs`` (C, H, W) float16 or None (too large)."""

    values: np.ndarray
    uncertainty: np.ndarray
    probs: np.ndarray | None
    classes: list[str]
    palette: list[list[int]]
    model_name: str
    working_size: tuple[int, int]


def segment(segmenter: Segmenter, image: np.ndarray, working_size: int | None = None,
            on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Segmentation:
    """``workbench.segment`` (working size: longer side, px; 0/None: the model's), as layer values."""
    if len(segmenter.classes) > MAX_CLASSES:
        raise FineMaskError(f"the plugin shows models of up to {MAX_CLASSES} classes; "
                            f"this one has {len(segmenter.classes)}")
    seg = workbench.segment(segmenter, image, working_size, on_progress=on_progress, cancel=cancel)
    return Segmentation(values=classes_to_layer(seg.labels), uncertainty=seg.uncertainty, probs=seg.probs,
                        classes=seg.classes, palette=seg.palette, model_name=seg.model_name,
                        working_size=seg.working_size)


@dataclass
class Refinement:
    """values: refined (H, W) layer values (same dtype as the input); changed: bool (H, W)."""

    values: np.ndarray
    changed: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def changed_fraction(self) -> float:
        return float(self.changed.mean()) if self.changed.size else 0.0


def refine(refiner: Refiner, image: np.ndarray, values: np.ndarray, probs: np.ndarray | None = None, *,
           mode: str = "full", on_progress: ProgressFn | None = None,
           cancel: CancelFn | None = None) -> Refinement:
    """``workbench.refine`` on any Labels layer's values (``mode``: "full", "fast", "local").

    Every value is a region, 0 included, so a mask drawn by hand on an empty layer refines like
    a binary mask. ``probs`` (C, H, W) of the segmentation that made the layer (the widget drops
    them once the layer is painted or refined) are used when no pixel is unlabelled: then the
    values are class ids + 1. No uncertainty is computed: napari shows it for segmentations only.
    """
    values = np.asarray(values)
    if probs is not None and values.ndim == 2 and values.size and int(values.min()) >= 1:
        classes = values.astype(np.uint16) - 1 if values.dtype != np.uint8 else values - np.uint8(1)
        out = workbench.refine(refiner, image, classes, probs, mode=mode, on_progress=on_progress, cancel=cancel)
        refined = (out.labels + 1).astype(values.dtype)
    else:
        out = workbench.refine(refiner, image, values, mode=mode, on_progress=on_progress, cancel=cancel)
        refined = out.labels
    return Refinement(values=refined, changed=refined != values, seconds=out.seconds)


def save_pair(store: Store, image: np.ndarray, values: np.ndarray, classes: Sequence[str], *,
              pair_id: str | None = None, image_file: str | Path | None = None, origin: str = "corrected",
              model_version: str | None = None, name: str | None = None,
              on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> SaveOutcome:
    """``workbench.save_to_store`` of a Labels layer (values above the model's classes are refused)."""
    labels = layer_to_classes(values, len(classes))
    return workbench.save_to_store(store, image, labels, classes, pair_id=pair_id, image_file=image_file,
                                   origin=origin, model_version=model_version, name=name,
                                   on_progress=on_progress, cancel=cancel)


def undo_pair(store: Store, pair_id: str, on_progress: ProgressFn | None = None,
              cancel: CancelFn | None = None) -> np.ndarray:
    """``workbench.undo_last_save``; the restored labels as layer values."""
    outcome = workbench.undo_last_save(store, pair_id, on_progress=on_progress, cancel=cancel)
    return classes_to_layer(outcome.labels)


def finetune(store: Store, base: str, *, steps: int, time_budget_s: float | None = None,
             on_progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             **options: Any) -> FinetuneResult:
    """``workbench.finetune``; ``options`` are further ``FinetuneConfig`` fields (batch size, crop, ...)."""
    from training.finetune import FinetuneConfig

    return workbench.finetune(store, base, FinetuneConfig(**options), steps=steps, time_budget_s=time_budget_s,
                              on_progress=on_progress, cancel=cancel)


_LOSS = re.compile(r"loss\s*[=:]?\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")


def parse_loss(message: str) -> float | None:
    """The loss in a progress message such as "train 12/300 · loss 0.41 · ETA 0:43"."""
    match = _LOSS.search(message or "")
    return float(match.group(1)) if match else None


# ------------------------------------------------------------------ settings
# (napari only: the web app's store is a server setting, given on its command line)


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
