"""Loaded models, kept once per process and reloaded when their checkpoint folder changes.

Every front end (napari, the web app, ``finemask segment``/``demo``, each ``finemask batch``
worker) loads its segmenters and refiners through a :class:`ModelCache`, so all of them follow
one rule: a model is loaded the first time it is asked for, kept (the least recently used ones
beyond ``capacity`` are dropped), and loaded again when the card or the weights file of its
folder changed since (their modification time or size), say after a fine-tuning run replaced
the folder. Shipped names and folders that lead to the same checkpoint share one entry.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import CARD_FILE, WEIGHTS_FILE, resolve
from .errors import FineMaskError

if TYPE_CHECKING:
    from .refine import Refiner
    from .segment import Segmenter

#: Models kept loaded by default (a segmenter and a refiner, plus two more to switch between).
DEFAULT_CAPACITY = 4
TASKS = ("segmentation", "refinement")


def folder_stamp(folder: Path) -> tuple[int, int, int, int]:
    """(card mtime ns, card size, weights mtime ns, weights size): what the reload rule compares."""
    try:
        card, weights = (folder / CARD_FILE).stat(), (folder / WEIGHTS_FILE).stat()
    except OSError as exc:
        raise FineMaskError(f"model folder is not readable ({exc.strerror})", folder) from None
    return card.st_mtime_ns, card.st_size, weights.st_mtime_ns, weights.st_size


class ModelCache:
    """Segmenters and refiners by checkpoint folder, device and precision; safe across threads.

    ``device``: default device of loaded models (None: CUDA when available). ``capacity``: most
    models kept at once. ``loads`` counts loads per ``"segmenter:<ref>"`` / ``"refiner:<ref>"``
    (``ref`` as asked for), so callers can check that a model was loaded once, not per image.
    """

    def __init__(self, device: str | None = None, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.device = device
        self.capacity = int(capacity)
        self.loads: dict[str, int] = {}
        self._models: OrderedDict[tuple[str, str, str, str], tuple[tuple[int, int, int, int], Any]] = OrderedDict()
        self._pinned: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def segmenter(self, ref: str | Path, *, device: str | None = None) -> Segmenter:
        """The segmentation model at ``ref`` (shipped or installed name, or folder)."""
        return self._get("segmentation", ref, device or self.device, "")

    def refiner(self, ref: str | Path, *, device: str | None = None, precision: str = "auto") -> Refiner:
        """The refinement model at ``ref``; ``precision`` as ``engine.refine.Refiner``."""
        return self._get("refinement", ref, device or self.device, precision)

    def model(self, task: str, ref: str | Path) -> Segmenter | Refiner:
        """``segmenter(ref)`` or ``refiner(ref)`` by task name."""
        if task == "segmentation":
            return self.segmenter(ref)
        if task == "refinement":
            return self.refiner(ref)
        raise FineMaskError(f"FineMask front ends use segmentation and refinement models, not {task!r} ones")

    def put(self, task: str, ref: str | Path, model: Any) -> None:
        """Use ``model`` for ``ref`` from now on, never reloaded (tests inject fakes this way)."""
        with self._lock:
            self._pinned[(task, str(ref))] = model

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._models.clear()
            self._pinned.clear()

    def __len__(self) -> int:
        return len(self._models)

    def _key(self, task: str, ref: str | Path, device: str | None, precision: str) -> tuple[str, str, str, str]:
        folder = resolve(ref).resolve()
        return task, str(folder), str(device or ""), precision

    def _get(self, task: str, ref: str | Path, device: str | None, precision: str) -> Any:
        with self._lock:
            if (task, str(ref)) in self._pinned:
                return self._pinned[(task, str(ref))]
            key = self._key(task, ref, device, precision)
            cached = self._models.get(key)
            stamp = folder_stamp(Path(key[1]))
            if cached is not None and cached[0] == stamp:
                self._models.move_to_end(key)
                return cached[1]
            self._models.pop(key, None)  # a changed folder: drop the old model before loading
            model = _load(task, Path(key[1]), device, precision)
            self._models[key] = (stamp, model)
            name = "segmenter" if task == "segmentation" else "refiner"
            self.loads[f"{name}:{ref}"] = self.loads.get(f"{name}:{ref}", 0) + 1
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model


def _load(task: str, folder: Path, device: str | None, precision: str) -> Any:
    if task == "segmentation":
        from .segment import Segmenter

        return Segmenter.from_pretrained(folder, device=device)
    from .refine import Refiner

    return Refiner.from_pretrained(folder, device=device, precision=precision or "auto")


_SHARED: ModelCache | None = None
_SHARED_LOCK = threading.Lock()


def shared_models() -> ModelCache:
    """The process-wide cache (command-line jobs, each ``finemask batch`` worker process)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = ModelCache()
        return _SHARED


__all__ = ["DEFAULT_CAPACITY", "ModelCache", "folder_stamp", "shared_models"]
