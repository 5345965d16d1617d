"""The service layer between the front ends (napari, the web app) and the engine.

- :mod:`~app.workbench.catalog`: the models on offer (shipped, installed, the store's fine-tuned
  versions, added folders) and one cache of loaded models with one reload rule;
- :mod:`~app.workbench.metrics`: card metrics in one scale (percent) and their summaries;
- :mod:`~app.workbench.images`: images from files or from a viewer's pixels;
- :mod:`~app.workbench.jobs`: open, segment, refine, apply an edit, save to the store, undo the
  last save, fine-tune; each takes ``on_progress`` and ``cancel`` and raises
  ``engine.errors.Cancelled`` when cancelled.

No UI library is imported here; front ends translate widgets and events into these calls.
"""
from __future__ import annotations

from .catalog import (
    DEFAULT_REFINER,
    DEFAULT_SEGMENTER,
    ModelCache,
    ModelCatalog,
    ModelEntry,
    default_refiner_name,
    not_installed_message,
)
from .images import MIN_SIDE, OpenedImage, inspect_header, pixels_for_engine
from .jobs import (
    KEEP_PROBS_BYTES,
    UNLABELLED,
    WORKING_SIZE_RANGE,
    CancelFn,
    FinetuneCancelled,
    ProgressFn,
    Refinement,
    SaveOutcome,
    Segmentation,
    UndoOutcome,
    apply_edit,
    check_store_classes,
    class_mismatch_message,
    finetune,
    open_image,
    pair_for_file,
    refine,
    save_to_store,
    segment,
    undo_last_save,
)
from .metrics import (
    BELOW_PARENT,
    below_parent,
    evaluation_line,
    metrics_details,
    metrics_summary,
    percent_card,
    percent_metrics,
)

__all__ = [
    "BELOW_PARENT", "below_parent",
    "DEFAULT_REFINER", "DEFAULT_SEGMENTER", "KEEP_PROBS_BYTES", "MIN_SIDE", "UNLABELLED", "WORKING_SIZE_RANGE",
    "CancelFn", "FinetuneCancelled", "ModelCache", "ModelCatalog", "ModelEntry", "OpenedImage", "ProgressFn",
    "Refinement", "SaveOutcome", "Segmentation", "UndoOutcome", "apply_edit", "check_store_classes",
    "class_mismatch_message", "default_refiner_name", "evaluation_line", "finetune", "inspect_header",
    "metrics_details", "metrics_summary", "not_installed_message", "open_image", "pair_for_file", "percent_card",
    "percent_metrics", "pixels_for_engine", "refine", "save_to_store", "segment", "undo_last_save",
]
