"""The models a person can pick, and the loaded models behind them.

:class:`ModelCatalog` lists, per task, the shipped models (``assets/models``), the models
installed with ``finemask models``, the fine-tuned versions of the open annotation store
(``<store>/models``) and folders added by hand, each as a :class:`ModelEntry` whose card's
metrics are in percent (:mod:`app.workbench.metrics`). It re-scans on every call (a fine-tuning
run may have added a version), re-reading a card only when its file changed. Models are loaded
through one :class:`ModelCache` (``engine.model_cache``: kept once, reloaded when the folder's
card or weights change).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine import model_cache
from engine.checkpoints import CARD_FILE, ModelCard, available_models, is_shipped, read_card, resolve
from engine.errors import FineMaskError
from engine.versions import list_versions

from .metrics import metrics_summary, percent_card

if TYPE_CHECKING:
    from engine.refine import Refiner
    from engine.segment import Segmenter

DEFAULT_SEGMENTER = "camvid"
#: The refiner offered first when ``engine.installed`` names no other default.
DEFAULT_REFINER = "refine-light"
TASKS = ("segmentation", "refinement")
#: How each origin is named in a model's label.
ORIGIN_WORDS = {"shipped": "shipped", "installed": "installed", "store": "fine-tuned", "folder": "folder"}


def default_refiner_name() -> str:
    """The default refinement model: the official CascadePSP weights once installed
    (``finemask models get cascadepsp``), else the shipped :data:`DEFAULT_REFINER`."""
    try:
        from engine.installed import default_refiner
    except ImportError:  # a FineMask without ``finemask models``
        return DEFAULT_REFINER
    return str(default_refiner())


def installed_models() -> list[tuple[str, Path]]:
    """(name, folder) of the segmentation and refinement models installed with ``finemask models``."""
    try:
        from engine.installed import list_installed
    except ImportError:  # a FineMask without ``finemask models``
        return []
    return [(m.name, Path(m.folder)) for m in list_installed() if m.kind in TASKS]


def not_installed_message(task: str, name: str) -> str:
    """What both front ends say when the default model of ``task`` is missing."""
    kind = "refinement" if task == "refinement" else "segmentation"
    fix = "add a refiner folder (or fine-tune one)" if task == "refinement" else "add a model folder"
    return f"the default {kind} model {name!r} is not installed; {fix}, or install it with `finemask models`"


@dataclass(frozen=True)
class ModelEntry:
    """A model on offer.

    ``key``: its name in the lists and the web API (unique in one listing). ``source``: what
    ``from_pretrained`` takes (a shipped or installed name, or the folder as given). ``origin``:
    "shipped", "installed", "store" (a fine-tuned version of the open store) or "folder" (added
    by hand). ``card``: its card with metrics in percent (None when not installed).
    ``available`` is False for a default that is not installed, listed so the UI can say so.
    """

    key: str
    source: str
    task: str
    origin: str
    card: ModelCard | None
    path: Path | None
    available: bool = True

    @property
    def label(self) -> str:
        """"camvid · shipped · mIoU 57.8", "camvid-ft1 · fine-tuned · mIoU 20.0 → 25.5"."""
        if not self.available:
            return f"{self.key} (not installed)"
        summary = metrics_summary(self.card) if self.card is not None else ""
        return f"{self.key} · {ORIGIN_WORDS[self.origin]}" + (f" · {summary}" if summary else "")

    @property
    def name(self) -> str:
        return self.card.name if self.card is not None and self.card.name else self.key


class ModelCache(model_cache.ModelCache):
    """``engine.model_cache.ModelCache`` with the front ends' message for a missing default refiner."""

    def refiner(self, ref: str | Path, *, device: str | None = None, precision: str = "auto") -> Refiner:
        if str(ref) in (DEFAULT_REFINER, default_refiner_name()):
            try:
                resolve(ref)
            except FineMaskError:
                raise FineMaskError(not_installed_message("refinement", str(ref))) from None
        return super().refiner(ref, device=device, precision=precision)


class ModelCatalog:
    """Models on offer for one front end: shipped, installed, the store's versions, added folders.

    ``store_root``: the open annotation store (None: none yet); ``folders``: model folders added
    by hand (command-line options of the web app, the napari "Add model folder" field).
    """

    def __init__(self, store_root: str | Path | None = None, folders: list[str | Path] | tuple = (), *,
                 cache: ModelCache | None = None, device: str | None = None):
        self.store_root = None if store_root is None else Path(store_root)
        self.folders: list[str] = []
        self.cache = cache if cache is not None else ModelCache(device=device)
        self._cards: dict[str, tuple[int, ModelCard | None]] = {}
        self._lock = threading.Lock()
        for folder in folders:
            if folder is not None and Path(str(folder)).expanduser().is_dir():
                self.add_folder(folder)

    # ------------------------------------------------------------------ listing

    def add_folder(self, folder: str | Path) -> ModelEntry:
        """Offer a model folder (any task); FineMaskError when it is not a readable model folder."""
        card = read_card(folder)
        if card.task not in TASKS:  # pragma: no cover - read_card accepts only these tasks
            raise FineMaskError(f"a {card.task!r} model is neither a segmenter nor a refiner", folder)
        if str(folder) not in self.folders:
            self.folders.append(str(folder))
        path = resolve(folder).resolve()
        return next(e for e in self.entries(card.task) if e.path == path)

    def entries(self, task: str | None = None, *, default: str | None = None) -> list[ModelEntry]:
        """Models of ``task`` (or all): shipped, installed, the store's (oldest first), added folders.

        The same folder is listed once. A ``default`` that is not installed is listed first as
        unavailable.
        """
        found: list[ModelEntry] = []
        seen_paths: set[Path] = set()
        keys: set[str] = set()

        def offer(name: str, source: str, folder: Path, origin: str) -> None:
            card = self._card(folder)
            if card is None or (task is not None and card.task != task) or folder in seen_paths:
                return
            seen_paths.add(folder)
            key, n = name, 2
            while key in keys:
                key, n = f"{name}-{n}", n + 1
            keys.add(key)
            found.append(ModelEntry(key, source, card.task, origin, card, folder))

        for name in available_models():
            try:
                folder = resolve(name).resolve()
            except FineMaskError:
                continue
            offer(name, name, folder, "shipped" if is_shipped(folder) else "installed")
        for name, folder in installed_models():
            offer(name, name, folder.resolve(), "installed")
        if self.store_root is not None and self.store_root.is_dir():
            for name, folder, _ in list_versions(self.store_root):
                offer(name, str(folder), folder.resolve(), "store")
        for given in self.folders:
            try:
                folder = resolve(given).resolve()
            except FineMaskError:
                continue
            card = self._card(folder)
            offer((card.name if card is not None and card.name else folder.name), given, folder, "folder")
        if default is not None and not any(default in (e.key, e.source) for e in found):
            found.insert(0, ModelEntry(default, default, task or "segmentation", "shipped", None, None, False))
        return found

    def entry(self, key: str | None, task: str | None = None) -> ModelEntry:
        """The entry called ``key`` (a key only, never a path: web clients cannot name server folders)."""
        entries = self.entries(task)
        for e in entries:
            if e.key == key:
                return e
        kind = f"{task} " if task else ""
        names = ", ".join(e.key for e in entries) or "none"
        raise FineMaskError(f"unknown {kind}model {key!r} (available: {names})")

    def by_source(self, source: str, task: str | None = None) -> ModelEntry | None:
        """The entry whose ``source`` is ``source`` (what the napari lists hold), or None."""
        return next((e for e in self.entries(task) if e.source == source), None)

    def find(self, name_or_path: str | Path, task: str) -> ModelEntry:
        """The entry of a configured model: a listed name, or a folder (added when not listed yet)."""
        if Path(str(name_or_path)).expanduser().is_dir():
            path = resolve(name_or_path).resolve()
            card = read_card(path)
            if card.task != task:
                raise FineMaskError(f"this is a {card.task} model, not a {task} model", path)
            known = [e for e in self.entries(task) if e.path == path]
            return known[0] if known else self.add_folder(name_or_path)
        for e in self.entries(task):
            if e.key == str(name_or_path) or e.source == str(name_or_path):
                return e
        try:
            card = read_card(name_or_path)
        except FineMaskError:
            if task == "refinement" and str(name_or_path) in (DEFAULT_REFINER, default_refiner_name()):
                raise FineMaskError(not_installed_message(task, str(name_or_path))) from None
            raise
        raise FineMaskError(f"this is a {card.task} model, not a {task} model", resolve(name_or_path))

    # ------------------------------------------------------------------ loading

    def load(self, entry: ModelEntry) -> Segmenter | Refiner:
        """The loaded model of ``entry`` (from the cache when its folder did not change)."""
        if not entry.available:
            raise FineMaskError(not_installed_message(entry.task, entry.key))
        return self.cache.model(entry.task, entry.source)

    def _card(self, folder: Path) -> ModelCard | None:
        """The card of ``folder`` in percent, re-read when the card file changed; None if unreadable."""
        try:
            stamp = (folder / CARD_FILE).stat().st_mtime_ns
        except OSError:
            return None
        with self._lock:
            cached = self._cards.get(str(folder))
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            card: ModelCard | None = percent_card(read_card(folder))
        except FineMaskError:
            card = None
        with self._lock:
            self._cards[str(folder)] = (stamp, card)
        return card


__all__ = ["DEFAULT_REFINER", "DEFAULT_SEGMENTER", "ModelCache", "ModelCatalog", "ModelEntry", "default_refiner_name",
           "installed_models", "not_installed_message"]
