"""Writer for Labels layers: FineMask class labels with their class names and colours.

Layer value k is written as class k - 1 and 0 (unlabelled) as 255, the inverse of the reader: a
uint16 zlib TIFF (names and palette in its description) or a palette PNG (names in a text chunk),
so a file written here opens as the same layer, names and colours included, and goes into a store
or ``finemask`` as is.

The file name gets ``.finemask`` before its extension (``corrected.tif`` is written as
``corrected.finemask.tif``): napari chooses readers by name alone, and that name is what makes
napari offer FineMask's reader for the file and for no ordinary TIFF or PNG (see reader.py).

napari's save dialog preselects its own labels writer (class + 1 as uint32, names lost): the dock
widget routes saves of FineMask labels layers here instead (:func:`route_saves`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FineMaskError

from .logic import layer_to_classes
from .reader import FINEMASK_SUFFIX

log = logging.getLogger(__name__)
SUFFIXES = (".tif", ".tiff", ".png")
PLUGIN = "finemask"


def finemask_name(path: str | Path) -> Path:
    """``path`` with ``.finemask`` before its extension (unchanged when it has it; ``.tif`` added
    when it has no extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not suffix or suffix == FINEMASK_SUFFIX:
        path, suffix = path.with_name(path.name + ".tif"), ".tif"
    if suffix not in SUFFIXES:
        raise FineMaskError("FineMask writes labels as .tif, .tiff or .png", path)
    stem = path.name[: -len(suffix)]
    if stem.lower().endswith(FINEMASK_SUFFIX):
        return path
    return path.with_name(f"{stem}{FINEMASK_SUFFIX}{path.suffix}")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: write ``data`` (a 2-D Labels layer) to ``path`` (.tif/.tiff/.png,
    renamed by :func:`finemask_name`); returns the path written."""
    from engine.io import write_labels as write

    target = finemask_name(path)
    values = np.asarray(data)
    info = (meta or {}).get("metadata", {}).get("finemask", {})
    classes = info.get("classes") or None
    palette = info.get("palette") if classes else None
    labels = layer_to_classes(values, len(classes) if classes else None)
    if target.suffix.lower() != ".png":
        labels = labels.astype(np.uint16)
    write(target, labels, palette=palette, classes=classes)
    if str(target) != str(path):
        log.info("FineMask labels written to %s", target)
    return [str(target)]


def is_finemask_labels(layer: Any) -> bool:
    """A Labels layer whose values are FineMask classes (it has class names)."""
    return getattr(layer, "_type_string", "") == "labels" and bool(
        layer.metadata.get("finemask", {}).get("classes"))


def route_saves(layers: Any, on_saved: Callable[[list[str]], None] | None = None) -> Callable[[], None]:
    """Make ``layers.save`` (napari's File > Save dialogs call it) use FineMask's writer for
    FineMask labels layers, unless another plugin's writer was chosen; returns the undo.

    The dialog's first file type is napari's own labels writer, so choosing nothing means napari's;
    for one FineMask labels layer written to .tif/.tiff/.png (or no extension) FineMask's is used.
    """
    original = layers.save
    previous = layers.__dict__.get("save")  # another dock widget's routing, kept under ours

    def save(path: str, *, selected: bool = False, plugin: str | None = None, _writer: Any = None) -> list[str]:
        chosen = [x for x in layers if x in layers.selection] if selected else list(layers)
        other_plugin = plugin not in (None, "napari") or (
            _writer is not None and getattr(_writer, "plugin_name", "napari") != "napari")
        suffix = Path(str(path)).suffix.lower()
        if (len(chosen) == 1 and is_finemask_labels(chosen[0]) and not other_plugin
                and (suffix in SUFFIXES or not suffix or suffix == FINEMASK_SUFFIX)):
            written = original(str(finemask_name(path)), selected=selected, plugin=PLUGIN)
            if on_saved is not None and written:
                on_saved(written)
            return written
        return original(path, selected=selected, plugin=plugin, _writer=_writer)

    layers.save = save

    def undo() -> None:
        if layers.__dict__.get("save") is save:
            if previous is None:
                del layers.save
            else:
                layers.save = previous

    return undo
