"""Reader for the images and labels FineMask writes: palette PNGs, store TIFFs, label TIFFs.

It claims a file only when it is confidently FineMask's, so ordinary microscopy TIFFs and photos
stay with napari's own reader (napari asks the user when two readers claim a file):

- a palette PNG (class ids with colours): labels;
- any image or labels file inside an annotation store (``images/`` or ``labels/`` next to a
  ``manifest.json``): image or labels;
- a single-channel integer TIFF with at most :data:`MAX_LABEL_VALUES` distinct values
  (what ``finemask segment -o x.tif`` writes): labels.

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
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_LABEL_SUFFIXES = (".tif", ".tiff", ".png")


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a function reading ``path`` if it is FineMask's, else None."""
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
            raise FineMaskError("not an image or label file FineMask wrote", p)
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
    """"labels", "image" or None (not a file this reader should claim)."""
    try:
        return _file_kind(Path(path))
    except OSError:  # e.g. a name too long for the file system: not ours to read
        return None


def _file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix not in _IMAGE_SUFFIXES or not path.is_file():
        return None
    root = store_root(path)
    if root is not None:
        if path.parent.name == "labels":
            return "labels" if suffix in _LABEL_SUFFIXES else None  # a .jpg is nobody's label map
        return "image"
    if suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                return "labels" if im.mode == "P" and im.format == "PNG" else None  # not a GIF named .png
        except Exception:  # noqa: BLE001 - not a readable PNG: leave it to other readers
            return None
    if suffix in (".tif", ".tiff"):
        return "labels" if _label_like_tiff(path) else None
    return None


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


def read_labels_layer(path: str | Path) -> LayerData:
    """A labels file as a FineMask Labels layer (palette from the PNG, names from the store)."""
    from engine.io import default_palette, read_labels

    path = Path(path)
    classes_ids = read_labels(path)
    if classes_ids.size and int(classes_ids.max()) > UNLABELLED:
        raise FineMaskError(f"class id {int(classes_ids.max())} is beyond what the plugin shows (0..254)", path)
    present = int(classes_ids[classes_ids != UNLABELLED].max(initial=0))
    names = _store_class_names(path)
    if names is None or len(names) <= present:
        names = [f"class {i}" for i in range(present + 1)]
    palette = _png_palette(path, len(names)) or default_palette(len(names))[: len(names)]
    meta = {"finemask": {"classes": names, "palette": palette, "origin": "corrected", "file": str(path)}}
    kwargs = {"name": path.stem, "colormap": label_colours(palette), "features": class_features(names),
              "metadata": meta}
    return classes_to_layer(classes_ids), kwargs, "labels"


def read_image_layer(path: str | Path) -> LayerData:
    """An image file as an Image layer, pixels as stored (uint8/uint16...).

    Other pixel types and layouts are normalised (and checked) the engine's way; a bad file is a
    FineMaskError naming it.
    """
    from engine.io import image_shape, read_image

    path = Path(path)
    image_shape(path)  # the engine's checks of the file type, header and pixel limit, before decoding
    try:
        data = _stored_pixels(path)
    except Exception as exc:  # noqa: BLE001 - the decoders raise many types for damaged files
        raise FineMaskError(f"cannot read the image: corrupt or truncated file ({exc})", path) from None
    if data is None:
        data = (read_image(path) * 255 + 0.5).astype(np.uint8)
    rgb = data.ndim == 3
    return data, {"name": path.stem, "rgb": rgb, "metadata": {"source_file": str(path)}}, "image"


def _stored_pixels(path: Path) -> np.ndarray | None:
    """The first image of ``path`` as stored when it is uint8/uint16 gray, RGB or RGBA, else None."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            samples_ok = page.axes == "YX" or (page.axes == "YXS" and page.shape[-1] in (3, 4))
            if not samples_ok or np.dtype(page.dtype) not in (np.uint8, np.uint16):
                return None
            return page.asarray()
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "I;16", "RGB", "RGBA"):
            return None
        im.load()
        return np.asarray(im)


def _store_class_names(path: Path) -> list[str] | None:
    root = store_root(path)
    if root is None:
        return None
    from engine.store import Store

    try:
        return Store.open(root, create=False).class_names
    except FineMaskError:
        return None


def _png_palette(path: Path, n: int) -> list[list[int]] | None:
    if path.suffix.lower() != ".png":
        return None
    from PIL import Image

    with Image.open(path) as im:
        flat = im.getpalette() if im.mode == "P" else None
    if not flat or len(flat) < 3 * n:
        return None
    return [list(flat[3 * i: 3 * i + 3]) for i in range(n)]
