"""FineMask engine: models, inference, tiling, refinement, I/O, store, checkpoints, metrics.

No UI imports here. Heavy classes are imported lazily so ``import engine`` stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import FineMaskError

__all__ = ["FineMaskError", "Segmenter", "SegResult", "Refiner"]

if TYPE_CHECKING:  # pragma: no cover
    from .refine import Refiner
    from .segment import Segmenter, SegResult


def __getattr__(name: str):
    if name in ("Segmenter", "SegResult"):
        from . import segment

        return getattr(segment, name)
    if name == "Refiner":
        from .refine import Refiner

        return Refiner
    raise AttributeError(name)
