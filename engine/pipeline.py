"""The per-image pipeline every front end runs: segment at working size, then (optionally) refine.

``finemask segment``, ``finemask demo``, each ``finemask batch`` task, napari and the web app all
go from pixels to labels through these two steps, so one image gives the same labels wherever it
is processed (same working size, same class probabilities handed to the refiner, same mode).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import Cancelled, FineMaskError
from .refine_modes import DEFAULT_MODE, REFINE_MODES, mode_options

if TYPE_CHECKING:
    from .refine import Refiner
    from .segment import Segmenter, SegResult

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


def refine_mode(fast: bool = False, skip_global: bool = False) -> str:
    """The mode name (``engine.refine_modes``) of the command line's ``--fast``/``--skip-global``."""
    if fast and skip_global:
        raise FineMaskError("fast (global step only) and skip_global (local step only) exclude each other")
    return "fast" if fast else "local" if skip_global else "full"


def check_cancel(cancel: CancelFn | None, what: str) -> None:
    """Raise ``Cancelled`` when ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise Cancelled(f"{what} cancelled")


def segment_step(segmenter: Segmenter, image: np.ndarray, working_size: int | None = None, *,
                 on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> SegResult:
    """Segment one image at ``working_size`` (longer side; None: the model's own)."""
    check_cancel(cancel, "segmentation")
    return segmenter.predict_batch([image], working_size or None, on_progress=on_progress, cancel=cancel)[0]


@dataclass
class Refined:
    """Refined labels (like the input: same shape and dtype) and the winning class's confidence
    (float32 (H, W), or None when not asked for)."""

    labels: np.ndarray
    confidence: np.ndarray | None = None


def probs_fit(labels: np.ndarray, probs: np.ndarray | None) -> bool:
    """Whether class probabilities (C, H, W) can serve as the coarse confidence of ``labels``:
    same size, and every label a class of ``probs``."""
    if probs is None or probs.ndim != 3 or tuple(probs.shape[1:]) != tuple(labels.shape):
        return False
    return labels.size == 0 or int(labels.max()) < probs.shape[0]


def refine_step(refiner: Refiner, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None, *,
                mode: str = DEFAULT_MODE, L: int = 900, selection: str | None = None, tile_batch: int | None = None,
                confidence: bool = False, on_progress: ProgressFn | None = None,
                cancel: CancelFn | None = None) -> Refined:
    """Refine a label map at full resolution in ``mode`` ("full", "fast", "local").

    Every label value is a region. ``probs`` are used as the coarse confidence only when they
    fit (:func:`probs_fit`); otherwise each class competes against a fixed 0.5, as in CascadePSP.
    """
    options = mode_options(mode)
    check_cancel(cancel, "refinement")
    out = refiner.refine_labels(image, labels, probs if probs_fit(labels, probs) else None, **options, L=L,
                                selection=selection, batch_size=tile_batch, on_progress=on_progress,
                                cancel=cancel, return_confidence=confidence)
    if confidence:
        refined, conf = out
        return Refined(refined, conf)
    return Refined(out)


@dataclass
class PipelineResult:
    """``labels``: the final (H, W) labels; ``segmentation``: the segmenter's result (labels before
    refinement, probabilities); ``refined``: whether a refiner ran; ``seconds`` per step."""

    labels: np.ndarray
    segmentation: SegResult
    refined: bool
    seconds: dict[str, float] = field(default_factory=dict)


def segment_image(segmenter: Segmenter, image: np.ndarray, *, working_size: int | None = None,
                  refiner: Refiner | None = None, mode: str = DEFAULT_MODE, L: int = 900,
                  selection: str | None = None, tile_batch: int | None = None,
                  on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> PipelineResult:
    """Segment ``image`` and, with a ``refiner``, refine the labels with the class probabilities."""
    if mode not in REFINE_MODES:
        mode_options(mode)  # the one error message for an unknown mode, before any work
    t0 = time.perf_counter()
    seg = segment_step(segmenter, image, working_size, on_progress=on_progress, cancel=cancel)
    seconds = {"segment": time.perf_counter() - t0}
    if refiner is None:
        return PipelineResult(seg.labels, seg, False, seconds)
    t0 = time.perf_counter()
    refined = refine_step(refiner, image, seg.labels, seg.probs, mode=mode, L=L, selection=selection,
                          tile_batch=tile_batch, on_progress=on_progress, cancel=cancel)
    seconds["refine"] = time.perf_counter() - t0
    return PipelineResult(refined.labels, seg, True, seconds)


__all__ = ["PipelineResult", "Refined", "check_cancel", "probs_fit", "refine_mode", "refine_step",
           "segment_image", "segment_step"]
