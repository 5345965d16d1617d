"""Label maps: which classes are refined, inside which boxes, and how their results combine.

A label map is refined as binary masks, one per class, each inside its bounding box enlarged by
25% (12.5% per side, at least 8 px: the reference's multi-class evaluation). The largest class is
the *complement*: it is not refined; it keeps what no refined class claims (with two classes this
is the reference's rule: refine the smaller, the larger is its complement). Arbitration
(``arbitrate``), per pixel with coarse label ``a``:

- ``a`` refined: the pixel keeps ``a`` while ``a``'s own refinement keeps it (confidence > 0.5).
  Released pixels go to the refined class claiming them most confidently (> 0.5), else to the
  most probable other class of ``probs`` when given, else to the complement;
- ``a`` the complement: the pixel goes to the refined class claiming it most confidently (> 0.5);
- ``a`` ignored (``ignore_index``): never changes.

So another class can take a pixel only where its own class lets it go. The earlier rule (every
class refined, the most confident wins, the coarse probability as the bar to beat) cut objects
along tile edges at 4K: the large background class's global step at L = 900 px erased the optic
disc and the lesions (they are a few pixels wide there), its refined "background" confidence
jumped where a local-step tile began (tile output vs. the global step's fallback), and wherever
it beat the disc's own confidence the disc was lost in a straight line
(``tests/engine/test_refine_classes.py`` reproduces this).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FineMaskError
from ..tiling import STRIP_ROWS

Box = tuple[int, int, int, int]
ProgressFn = Callable[[int, int, str], None]
#: ``refine_box(box, mask, on_progress) -> float32 confidence of the box`` for one class.
RefineBoxFn = Callable[[Box, np.ndarray, "ProgressFn | None"], np.ndarray]
CLAIM = 0.5  # a class keeps or claims a pixel above this confidence


@dataclass
class ClassPlan:
    """The classes of a label map and what happens to each."""

    classes: list[int]  # present, except the ignored value
    refined: list[int]  # refined, in order
    complement: int | None  # the largest class: not refined, takes what nobody keeps
    boxes: dict[int, Box]


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Pixel count per class value (bincount in row strips; labels are non-negative)."""
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if labels.size and int(labels.min()) < 0:
        raise FineMaskError("labels must be non-negative class indices")
    top = int(labels.max()) + 1 if labels.size else 1
    counts = np.zeros(top, np.int64)
    flat = labels.reshape(-1)
    for s in range(0, flat.size, 1 << 24):
        counts += np.bincount(flat[s:s + (1 << 24)], minlength=top)
    return counts


def enlarged_bboxes(labels: np.ndarray, classes: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """Per class, the bounding box (y0, y1, x0, x1) grown by 12.5% of its size per side (25% in
    all, as in the reference's multi-class evaluation), at least 8 px, clipped to the image.
    Computed in row strips (no full-size temporaries)."""
    H, W = labels.shape
    rows = {c: np.zeros(H, bool) for c in classes}
    cols = {c: np.zeros(W, bool) for c in classes}
    for r0 in range(0, H, STRIP_ROWS):
        strip = labels[r0:r0 + STRIP_ROWS]
        for c in classes:
            m = strip == c
            rows[c][r0:r0 + STRIP_ROWS] = m.any(axis=1)
            cols[c] |= m.any(axis=0)
    boxes = {}
    for c in classes:
        ry, cx = np.flatnonzero(rows[c]), np.flatnonzero(cols[c])
        y0, y1, x0, x1 = int(ry[0]), int(ry[-1]) + 1, int(cx[0]), int(cx[-1]) + 1
        gy, gx = max(8, round(0.125 * (y1 - y0))), max(8, round(0.125 * (x1 - x0)))
        boxes[c] = (max(0, y0 - gy), min(H, y1 + gy), max(0, x0 - gx), min(W, x1 + gx))
    return boxes


def plan_classes(labels: np.ndarray, ignore_index: int | None = None) -> ClassPlan:
    """Classes present, their boxes, the complement (largest, ties to the lower value) and the rest.

    A class whose enlarged box holds nothing else (it fills the box) has no boundary to refine
    and is skipped."""
    counts = class_counts(labels)
    classes = [int(c) for c in np.flatnonzero(counts) if ignore_index is None or c != ignore_index]
    if len(classes) < 2:
        return ClassPlan(classes, [], classes[0] if classes else None, {})
    boxes = enlarged_bboxes(labels, classes)
    complement = max(classes, key=lambda c: (counts[c], -c))
    refined = []
    for c in classes:
        y0, y1, x0, x1 = boxes[c]
        if c != complement and counts[c] < (y1 - y0) * (x1 - x0):
            refined.append(c)
    return ClassPlan(classes, refined, complement, boxes)


def arbitrate(labels: np.ndarray, probs: Any, plan: ClassPlan, confidences: Iterable[tuple[int, np.ndarray]], *,
              return_confidence: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Combine refined class confidences into labels (rules in the module docstring).

    ``confidences`` yields ``(class, float32 confidence of its box)`` for the refined classes, one
    at a time (only the running maxima are kept). ``probs``: (C, H, W) indexable by row strips,
    or None. Returns labels like ``labels`` and, with ``return_confidence``, a float32 (H, W)
    confidence of the result (1 where nothing was refined).
    """
    H, W = labels.shape
    out = labels.copy()
    if not plan.refined:
        return (out, np.ones((H, W), np.float32)) if return_confidence else out
    own = np.ones((H, W), np.float32)  # the coarse label's own refined confidence
    other = np.zeros((H, W), np.float32)  # best confidence of another refined class
    who = np.full((H, W), -1, np.int16 if len(plan.refined) < 32767 else np.int32)
    for c, conf in confidences:
        y0, y1, x0, x1 = plan.boxes[c]
        k = plan.refined.index(c)
        for r0 in range(y0, y1, STRIP_ROWS):  # row strips: no box-sized temporaries
            r1 = min(y1, r0 + STRIP_ROWS)
            mine = labels[r0:r1, x0:x1] == c
            cf = conf[r0 - y0:r1 - y0]
            np.copyto(own[r0:r1, x0:x1], cf, where=mine)
            better = ~mine & (cf > other[r0:r1, x0:x1])
            np.copyto(other[r0:r1, x0:x1], cf, where=better)
            np.copyto(who[r0:r1, x0:x1], k, where=better)
    conf_out = np.ones((H, W), np.float32) if return_confidence else None
    refined = np.asarray(plan.refined)
    n_prob = probs.shape[0] if probs is not None else 0
    for r0 in range(0, H, STRIP_ROWS):
        r1 = min(H, r0 + STRIP_ROWS)
        lab, o, ot, w = labels[r0:r1], own[r0:r1], other[r0:r1], who[r0:r1]
        released = o <= CLAIM
        free = released | (lab == plan.complement)
        taken = free & (ot > CLAIM)
        strip = out[r0:r1]
        strip[taken] = refined[w[taken]].astype(out.dtype)
        rest = released & ~taken
        if rest.any():
            strip[rest] = _second_choice(lab, rest, probs, plan, r0, r1, n_prob).astype(out.dtype)
        if conf_out is not None:
            cf = conf_out[r0:r1]
            kept_refined = ~released & np.isin(lab, refined)
            cf[kept_refined] = o[kept_refined]
            kept_complement = (lab == plan.complement) & ~taken
            cf[kept_complement] = 1.0 - ot[kept_complement]
            cf[taken] = ot[taken]
            cf[rest] = 1.0 - o[rest]
    return (out, conf_out) if return_confidence else out


def _second_choice(lab: np.ndarray, rest: np.ndarray, probs: Any, plan: ClassPlan, r0: int, r1: int,
                   n_prob: int) -> np.ndarray:
    """For released pixels nobody claims: the most probable other present class, else the complement."""
    if probs is None:
        return np.full(int(rest.sum()), plan.complement)
    candidates = np.asarray([c for c in plan.classes if c < n_prob])
    p = np.asarray(probs[:, r0:r1])[candidates][:, rest].astype(np.float32)  # (K, n)
    p[candidates[:, None] == lab[rest][None, :]] = -1.0  # not the class that let go
    return candidates[p.argmax(axis=0)]


def arbitrate_classes(labels: np.ndarray, probs: Any, refine_box: RefineBoxFn, *, ignore_index: int | None = None,
                      on_progress: ProgressFn | None = None,
                      before_work: Callable[[dict[int, Box]], None] | None = None,
                      return_confidence: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Refine a label map class by class with ``refine_box`` and arbitrate (module docstring).

    ``refine_box`` refines one class's binary mask inside its enlarged box (in memory, or tile by
    tile on a cluster: ``engine.huge``). ``probs``: (C, H, W) indexable by row strips, or None.
    ``before_work(boxes of the refined classes)`` runs once the plan is known (the memory guard).
    """
    if probs is not None and labels.size:
        top = int(labels.max()) if ignore_index is None else max(
            (c for c in np.flatnonzero(class_counts(labels)) if c != ignore_index), default=0)
        if top >= probs.shape[0]:
            raise FineMaskError(f"labels contain class {top} but probs has {probs.shape[0]} classes")
    plan = plan_classes(labels, ignore_index)
    if plan.refined and before_work is not None:
        before_work({c: plan.boxes[c] for c in plan.refined})
    n = len(plan.refined)

    def progress_for(k: int) -> ProgressFn | None:
        if on_progress is None:
            return None
        c = plan.refined[k]
        return lambda d, t, m: on_progress(k * 1000 + int(1000 * d / max(t, 1)), n * 1000,
                                           f"class {c} ({k + 1}/{n}): {m}")

    def confidences() -> Iterator[tuple[int, np.ndarray]]:
        for k, c in enumerate(plan.refined):
            y0, y1, x0, x1 = plan.boxes[c]
            yield c, refine_box(plan.boxes[c], labels[y0:y1, x0:x1] == c, progress_for(k))

    return arbitrate(labels, probs, plan, confidences(), return_confidence=return_confidence)
