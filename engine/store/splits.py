"""Which split (train or validation) a new pair gets: fixed by its image hash, kept forever."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .manifest import VALIDATION_FRACTION

#: From this many pairs on, at least one pair is in validation.
MIN_PAIRS_FOR_VALIDATION = 5


def assign_split(image_sha256: str, existing: Iterable[dict[str, Any]], fraction: float = VALIDATION_FRACTION) -> str:
    """The split of a new pair, given the records already in the store.

    Rule, applied once when a pair is added (the result is stored and never changed, so adding
    pairs never moves existing ones):

    1. an image already in the store gets the split of that pair (no image in both splits);
    2. else the pair goes to validation when its :func:`split_score` (the leading bits of the image
       SHA-256 read as a fraction in [0, 1)) is below ``fraction`` and validation holds fewer
       than ``floor(fraction * n)`` of the ``n`` pairs the store will hold (so a small store
       keeps its first pairs for training, and chance never puts most pairs in validation);
    3. else, if the store will hold ``MIN_PAIRS_FOR_VALIDATION`` or more pairs and none is in
       validation yet, the pair goes to validation (so a store of 5 has at least one);
    4. else train.
    """
    existing = list(existing)
    for rec in existing:
        if rec["image_sha256"] == image_sha256:
            return rec["split"]
    n = len(existing) + 1
    in_validation = sum(r["split"] == "validation" for r in existing)
    if split_score(image_sha256) < fraction and in_validation < int(fraction * n + 1e-9):
        return "validation"
    if n >= MIN_PAIRS_FOR_VALIDATION and in_validation == 0:
        return "validation"
    return "train"


def split_score(sha256_hex: str) -> float:
    """A number in [0, 1) fixed by a SHA-256 hex digest (its first 53 bits, exact in a float)."""
    return (int(sha256_hex[:16], 16) >> 11) / 2.0**53
