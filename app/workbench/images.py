"""Opening an image: from a file (the web app) or from pixels a viewer already holds (napari).

Both give the engine an (H, W) or (H, W, 3/4) array it accepts without another copy: uint8 and
uint16 images keep their bit depth (a 16-bit 8K image as float32 would need twice the memory).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import FineMaskError
from engine.io import image_shape, read_image

#: Smallest image side accepted: below it there is nothing to segment.
MIN_SIDE = 8


@dataclass
class OpenedImage:
    """An image ready for the jobs: ``image`` (H, W, 3) uint8 for 8-bit files, uint16 for 16-bit
    ones, float32 in [0, 1] otherwise; ``notes`` tell the user about its layout (alpha, grey,
    multi-page, bit depth)."""

    name: str
    image: np.ndarray
    path: Path | None
    notes: list[str] = field(default_factory=list)


def open_image(path: str | Path, *, max_pixels: int | None = None, name: str | None = None) -> OpenedImage:
    """Check and read an image file; problems are one FineMaskError naming the file as ``name``
    (what the user calls it, say the uploaded file's name) or as ``path``."""
    path = Path(path)
    shown = Path(name or path.name)
    try:
        H, W = image_shape(path, max_pixels=max_pixels)
        if min(H, W) < MIN_SIDE:
            raise FineMaskError(f"image is only {W}x{H} pixels; FineMask needs at least {MIN_SIDE}x{MIN_SIDE}")
        bits, notes = inspect_header(path)
        image = read_image(path, max_pixels=max_pixels)
    except FineMaskError as exc:
        raise FineMaskError(exc.problem, shown) from None
    except Exception as exc:  # noqa: BLE001 - a header the engine accepted but Pillow/tifffile choke on
        raise FineMaskError(f"cannot read the image: corrupt or unsupported file ({exc})", shown) from None
    if bits == 8:
        image = (image * 255.0 + 0.5).astype(np.uint8)
    elif bits == 16:
        image = (image * 65535.0 + 0.5).astype(np.uint16)
    return OpenedImage(name=shown.stem or "image", image=image, path=path, notes=notes)


def inspect_header(path: Path) -> tuple[int, list[str]]:
    """Bit depth (8, 16 or 32) of an image file and notes for the user about its layout."""
    import tifffile
    from PIL import Image

    notes: list[str] = []
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            dtype, shape = np.dtype(page.dtype), tuple(page.shape)
            channels = shape[-1] if len(shape) == 3 and shape[-1] <= 4 else (shape[0] if len(shape) == 3 else 1)
            if len(tif.pages) > 1:
                notes.append("multi-page TIFF: only the first page is used")
        bits = 8 if dtype == np.uint8 else 16 if dtype == np.uint16 else 32
        alpha = channels in (2, 4)
        gray = channels in (1, 2)
    else:
        with Image.open(path) as img:
            mode = img.mode
            alpha = mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            bits = 16 if mode.startswith("I;16") else 8
            gray = mode in ("L", "LA", "1") or mode.startswith("I;16")
    if bits == 16:
        notes.append("16-bit image: analysed at full precision; shown contrast-stretched to 8 bits")
    elif bits == 32:
        notes.append("floating-point image: values are used as they are (expected in 0..1)")
    if alpha:
        notes.append("transparency (alpha channel) is ignored: the image is analysed as RGB")
    if gray:
        notes.append("grey-scale image: analysed as RGB with three equal channels")
    return bits, notes


def pixels_for_engine(data: np.ndarray, rgb: bool, contrast_limits: Sequence[float] | None = None) -> np.ndarray:
    """Pixels a viewer shows, as the engine takes them: (H, W) or (H, W, 3/4).

    uint8, uint16, bool and float in [0, 1] pass unchanged (no copy); other types (int32, float
    microscopy data) are scaled to [0, 1] float32 with the contrast limits, which is what the
    user sees.
    """
    arr = np.asarray(data)
    two_d = arr.ndim == 2 or (rgb and arr.ndim == 3 and arr.shape[-1] in (3, 4))
    if not two_d:
        raise FineMaskError(
            f"FineMask works on 2-D grey or RGB images; this layer has shape {arr.shape}. "
            "Take one plane first (e.g. layer.data[0])"
        )
    if arr.dtype in (np.uint8, np.uint16, bool):
        return arr
    if arr.dtype.kind == "f" and arr.size and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
        return arr
    if arr.dtype.kind not in "iuf":
        raise FineMaskError(f"unsupported pixel type {arr.dtype}")
    if contrast_limits:
        lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = (arr.astype(np.float32) - lo) * scale
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0, out=out)


__all__ = ["MIN_SIDE", "OpenedImage", "inspect_header", "open_image", "pixels_for_engine"]
