"""Validation held back from the training pairs, for a store that has no validation pairs.

Without validation pairs a fine-tuned version would have no before/after scores, and a version
that got worse would look like the good ones. So fine-tuning then holds back a strip of every
training pair: the last :data:`HOLDOUT_FRACTION` of each image along its longer side is never
trained on, and base and new model are both scored on those strips. The two parts are views of
the store (:class:`PairPart`) whose ``load`` returns only their part of each pair; everything
else is the store's own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.store import Store

#: Share of each training pair (along its longer side, at its end) held back for scoring.
HOLDOUT_FRACTION = 0.2
#: What the scores of a run with held-back validation say about themselves.
HELD_OUT = "held-back strip"


def split_at(length: int) -> int:
    """Where the held-back strip of a side of ``length`` pixels starts (at least 1 pixel each side)."""
    return int(min(max(1, round(length * (1.0 - HOLDOUT_FRACTION))), max(1, length - 1)))


def part_of(array: np.ndarray, part: str) -> np.ndarray:
    """The "train" part (first 80 %) or the "held" part (last 20 %) of an (H, W, ...) array, cut
    across its longer side."""
    if part not in ("train", "held"):
        raise ValueError(f"part must be 'train' or 'held', got {part!r}")
    H, W = array.shape[:2]
    if W >= H:
        cut = split_at(W)
        return array[:, :cut] if part == "train" else array[:, cut:]
    cut = split_at(H)
    return array[:cut] if part == "train" else array[cut:]


class PairPart:
    """A view of ``store`` whose ``load(pair_id)`` gives only one part ("train" or "held") of each
    pair's image and labels; every other attribute is the store's."""

    def __init__(self, store: Store, part: str):
        part_of(np.zeros((2, 2)), part)  # an unknown part is refused here
        self._store, self.part = store, part

    def load(self, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self._store.load(pair_id)
        return part_of(image, self.part), part_of(labels, self.part)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


__all__ = ["HELD_OUT", "HOLDOUT_FRACTION", "PairPart", "part_of", "split_at"]
