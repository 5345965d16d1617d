"""Writing label maps and images atomically; a failed write (a full disk) leaves no file behind."""
from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..atomic import atomic_path
from ..errors import FineMaskError
from .label_info import LABEL_INFO_KEY, label_info_json
from .pixels import image_from_array, labels_from_array


def write_labels(path: str | Path, labels: np.ndarray, *, palette: list[list[int]] | None = None,
                 classes: list[str] | None = None) -> Path:
    """Write a class map atomically: ``.tif``/``.tiff`` (zlib, uint8 or uint16) or palette ``.png``.

    A palette PNG holds at most 256 classes; ``palette`` gives RGB triples per class. With
    ``classes`` (names) or a ``palette``, a TIFF also carries both as JSON in its image description,
    and a PNG its names in a text chunk, both under the key ``finemask`` (:func:`read_label_info`).
    """
    path = Path(path)
    labels = labels_from_array(labels, path)
    suffix = path.suffix.lower()
    info = label_info_json(classes, palette)
    if suffix in (".tif", ".tiff"):
        extra = {"description": info, "metadata": None} if info else {}
        with _writing(path) as tmp:
            tifffile.imwrite(tmp, labels, compression="zlib", photometric="minisblack", **extra)
    elif suffix == ".png":
        if labels.max() > 255:
            raise FineMaskError("a palette PNG holds class ids up to 255; save as .tif instead", path)
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(_palette_bytes(palette))
        text = None
        if classes:
            from PIL.PngImagePlugin import PngInfo

            text = PngInfo()
            text.add_text(LABEL_INFO_KEY, info)
        with _writing(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=text)
    else:
        raise FineMaskError(f"unsupported label file type {suffix!r} (use .tif or .png)", path)
    return path


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an image atomically: PNG/JPEG for uint8, TIFF (zlib) for other dtypes."""
    path = Path(path)
    arr = np.asarray(image)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        with _writing(path) as tmp:
            tifffile.imwrite(tmp, arr, compression="zlib")
    elif suffix in (".png", ".jpg", ".jpeg"):
        if arr.dtype != np.uint8:
            arr = (np.clip(image_from_array(arr, path), 0, 1) * 255 + 0.5).astype(np.uint8)
        with _writing(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG" if suffix == ".png" else "JPEG", quality=95)
    else:
        raise FineMaskError(f"unsupported image file type {suffix!r}", path)
    return path


def default_palette(n: int = 256) -> list[list[int]]:
    """A fixed, well-separated colour per class (class 0 black)."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, size=(n, 3))
    colours[0] = 0
    return colours.tolist()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """``atomic_path``, with a failed write (full disk, no permission, a file where a folder
    should be) as one FineMaskError naming the file; the temporary file is removed."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (the disk is full: nothing was written)"
        raise FineMaskError(f"cannot write the file: {reason}", path) from None


def _palette_bytes(palette: list[list[int]] | None) -> list[int]:
    pal = [list(map(int, c[:3])) for c in (palette or [])]
    pal += default_palette(256)[len(pal):]
    return [v for c in pal[:256] for v in c]
