"""Reader for the files FineMask writes: labels with class names, and annotation store files.

napari picks readers by file name alone (npe2 ``filename_patterns``) and asks the user to choose
whenever two readers match, so the manifest registers only names that are FineMask's:

- ``*.finemask.tif`` / ``*.finemask.tiff`` / ``*.finemask.png``: labels FineMask's writer wrote
  (class names and colours inside: ``engine.io.read_label_info``);
- ``*.v<N>.tif``: a labels version in an annotation store (``labels/<id>.v<N>.tif``).

Ordinary photos and microscopy files never match, so napari's own reader opens them without a
dialog. A file this reader is asked for (by those patterns, by ``plugin="finemask"``, or because
the user told napari to remember FineMask for an extension) is never refused when it is a
readable 2-D image: what is not labels opens as an image, read by ``engine.io`` (EXIF
orientation, 16-bit colour PNGs, truncated-file checks). Stacks and other layouts napari's own
reader handles are left to it (the hook returns None).

Labels open as a FineMask Labels layer: value = class id + 1, 0 = unlabelled (see logic.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FineMaskError

from .logic import UNLABELLED, class_features, classes_to_layer, label_colours

LayerData = tuple[np.ndarray, dict[str, Any], str]
#: A single-channel integer TIFF with at most this many distinct values is read as labels.
MAX_LABEL_VALUES = 64
#: The name FineMask's writer gives label files (before .tif/.png): what the manifest's patterns match.
FINEMASK_SUFFIX = ".finemask"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_LABEL_SUFFIXES = (".tif", ".tiff", ".png")


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a function reading ``path`` if this reader can, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(file_kind(p) is None for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        kind = file_kind(p)
        if kind == "labels":
            layers.append(read_labels_layer(p))
        elif kind == "image":
            layers.append(read_image_layer(p))
        else:
            raise FineMaskError("not a 2-D image or label file", p)
    return layers


def store_root(path: str | Path) -> Path | None:
    """The annotation store holding ``path`` in its images/ or labels/ folder, else None."""
    path = Path(path)
    root = path.parent.parent
    if path.parent.name not in ("images", "labels") or not (root / "manifest.json").is_file():
        return None
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return root if isinstance(manifest, dict) and manifest.get("format") == "finemask-store" else None


def file_kind(path: str | Path) -> str | None:
    """"labels", "image" or None (a file this reader leaves to others)."""
    try:
        return _file_kind(Path(path))
    except OSError:  # e.g. a name too long for the file system: not ours to read
        return None


def _file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix not in _IMAGE_SUFFIXES or not path.is_file():
        return None
    if suffix in _LABEL_SUFFIXES:
        from engine.io import read_label_info

        if read_label_info(path).get("classes"):
            return "labels"  # names inside: written by FineMask
    root = store_root(path)
    if root is not None and path.parent.name == "labels":
        return "labels" if suffix in _LABEL_SUFFIXES else None  # a .jpg is nobody's label map
    if root is None and suffix == ".png" and _palette_png(path):
        return "labels"
    if root is None and suffix in (".tif", ".tiff") and _label_like_tiff(path):
        return "labels"
    return "image" if _plain_2d_image(path) else None


def _palette_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode == "P" and im.format == "PNG"  # not a GIF named .png
    except Exception:  # noqa: BLE001 - not a readable PNG: leave it to other readers
        return False


def _label_like_tiff(path: Path) -> bool:
    import tifffile

    from engine.io import max_pixels_limit

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if len(tif.pages) != 1 or page.ndim != 2 or np.dtype(page.dtype).kind not in "ui":
                return False
            if int(np.prod(page.shape, dtype=np.int64)) > max_pixels_limit():
                return False  # never decode a page over the pixel limit just to look at it
            data = page.asarray()
    except Exception:  # noqa: BLE001 - unreadable: leave it to other readers
        return False
    return np.unique(data).size <= MAX_LABEL_VALUES


def _plain_2d_image(path: Path) -> bool:
    """A file engine.io reads as one 2-D picture (a multi-page TIFF is a stack: napari's reader
    shows all of it); damaged files count, so that reading them gives engine.io's error."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return True
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages) == 1 and len(tif.series) <= 1
    except Exception:  # noqa: BLE001 - damaged: engine.io names the problem when it is read
        return True


def read_labels_layer(path: str | Path) -> LayerData:
    """A labels file as a FineMask Labels layer (names and colours from the file or the store)."""
    from engine.io import default_palette, read_label_info, read_labels

    path = Path(path)
    classes_ids = read_labels(path)
    if classes_ids.size and int(classes_ids.max()) > UNLABELLED:
        raise FineMaskError(f"class id {int(classes_ids.max())} is beyond what the plugin shows (0..254)", path)
    present = int(classes_ids[classes_ids != UNLABELLED].max(initial=0))
    info = read_label_info(path)
    store_names, pair_id = _store_pair(path)
    names = info.get("classes") or store_names
    named = names is not None and len(names) > present
    if not named:
        names = [f"class {i}" for i in range(present + 1)]
    palette = info.get("palette") or _png_palette(path, len(names)) or default_palette(len(names))
    palette = (palette + default_palette(len(names))[len(palette):])[: len(names)]
    meta = {"finemask": {"origin": "corrected", "file": str(path)}}
    if named:  # names the file or its store gives; made-up ones stay out (the dock asks for real ones)
        meta["finemask"].update(classes=list(names), palette=palette)
    if pair_id is not None:  # the pair's current labels: saving them again makes a new version, no question
        meta["finemask"]["pair"] = {"store": str(store_root(path)), "id": pair_id}
    kwargs = {"name": _layer_name(path), "colormap": label_colours(palette, names), "features": class_features(names),
              "metadata": meta}
    return classes_to_layer(classes_ids), kwargs, "labels"


def read_image_layer(path: str | Path) -> LayerData:
    """An image file as an Image layer, pixels as decoded by ``engine.io.read_pixels`` (uint8/uint16
    kept; EXIF orientation applied; a bad file is a FineMaskError naming it)."""
    from engine.io import read_pixels

    path = Path(path)
    data = read_pixels(path)
    if data.ndim == 3 and data.shape[-1] == 1 or data.ndim == 3 and data.shape[-1] == 2:
        data = data[..., 0]
    rgb = data.ndim == 3
    return data, {"name": _layer_name(path), "rgb": rgb, "metadata": {"source_file": str(path)}}, "image"


def _layer_name(path: Path) -> str:
    name = path.stem
    return name[: -len(FINEMASK_SUFFIX)] if name.lower().endswith(FINEMASK_SUFFIX) else name


def _store_pair(path: Path) -> tuple[list[str] | None, str | None]:
    """The class names of the store holding ``path`` and the id of the pair whose current labels
    it is (None, None outside a store)."""
    root = store_root(path)
    if root is None:
        return None, None
    from engine.store import Store

    try:
        store = Store.open(root, create=False)
        target = path.resolve()
        pair = next((rec.id for rec in store.pairs() if Path(rec.labels_path).resolve() == target), None)
        return store.class_names, pair
    except FineMaskError:
        return None, None


def _png_palette(path: Path, n: int) -> list[list[int]] | None:
    if path.suffix.lower() != ".png":
        return None
    from PIL import Image

    with Image.open(path) as im:
        flat = im.getpalette() if im.mode == "P" else None
    if not flat or len(flat) < 3 * n:
        return None
    return [list(flat[3 * i: 3 * i + 3]) for i in range(n)]
