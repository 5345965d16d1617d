"""Reading PNG and JPEG pixels: Pillow's lazy open for the header, libpng for 16-bit colour PNGs,
a truncation check for label PNGs, and the EXIF orientation applied."""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import FineMaskError
from .checks import check_memory, check_pixels

#: EXIF tag of the orientation (1 = as stored; 2-8 = mirrored and/or turned).
EXIF_ORIENTATION = 0x0112
#: Channels per PNG colour type (IHDR), before palette expansion.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 interlace passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


# Our own pixel limit replaces Pillow's bomb check (which would raise a non-FineMask error).
Image.MAX_IMAGE_PIXELS = None
# A file that ends early is an error, never an image padded with black.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def read_pil(path: Path, max_pixels: int | None, labels: bool) -> np.ndarray:
    """A PNG or JPEG: header, pixel limit and memory checked by Pillow's lazy open, then decoded
    (images' PNGs by libpng, which keeps 16-bit colour and refuses short image data; label PNGs
    by Pillow, palette indices kept, after a check of the image data's length), then oriented."""
    try:
        with Image.open(path) as img:
            check_pixels(path, (img.height, img.width), max_pixels)
            orientation = exif_orientation(img)
            png = _png_header(path) if img.format == "PNG" else None
            check_memory(path, _decoded_bytes(img, png, labels), img.height * img.width, labels)
            if getattr(img, "n_frames", 1) > 1:
                warnings.warn(f"{path}: multi-frame image, using the first frame only", stacklevel=3)
            if png is not None and not labels:
                arr = _decode_png(path)
            else:
                arr = _pil_pixels(img, path, labels, png)
        return arr if orientation == 1 else np.ascontiguousarray(_orient(arr, orientation))
    except FineMaskError:
        raise
    except UnidentifiedImageError:
        raise FineMaskError("not a readable image: unknown format or wrong file extension", path) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError/SyntaxError/ValueError for damaged files
        raise FineMaskError(f"cannot decode image: corrupt or truncated file ({exc})", path) from None


def _pil_pixels(img: Image.Image, path: Path, labels: bool, png: tuple[int, ...] | None) -> np.ndarray:
    if labels:
        if img.mode not in ("P", "L", "I;16", "I", "1"):
            raise FineMaskError(f"label PNG must be a palette or gray image of class ids, found mode {img.mode}", path)
        if png is not None:
            _check_png_complete(path, png)
        img.load()
        return np.asarray(img)
    img.load()
    if img.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "I;16" or img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    elif img.mode in ("I", "F"):
        raise FineMaskError(f"unsupported pixel mode {img.mode}", path)
    return np.asarray(img)


def _decode_png(path: Path) -> np.ndarray:
    """A PNG's first image by libpng (imagecodecs): 8 or 16 bits per sample as stored."""
    import imagecodecs

    try:
        return imagecodecs.png_decode(path.read_bytes())
    except imagecodecs.PngError as exc:
        if "not enough image data" in str(exc).lower():
            raise FineMaskError("truncated PNG: its image data ends before the last row", path) from None
        raise FineMaskError(f"cannot decode image: corrupt or truncated PNG ({exc})", path) from None


def _png_header(path: Path) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise FineMaskError("corrupt PNG: no IHDR chunk where it belongs", path)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if colour not in _PNG_CHANNELS:
        raise FineMaskError(f"corrupt PNG: unknown colour type {colour}", path)
    return width, height, depth, colour, interlace


def _decoded_bytes(img: Image.Image, png: tuple[int, ...] | None, labels: bool) -> int:
    """Bytes of the decoded pixels, from the header."""
    pixels = img.width * img.height
    if png is not None:
        _, _, depth, colour, _ = png
        channels = 1 if labels and colour == 3 else (4 if colour == 3 else _PNG_CHANNELS[colour])
        return pixels * channels * (2 if depth == 16 else 1)
    bands = len(img.getbands())
    return pixels * (4 if bands == 3 else bands)  # Pillow holds 3-band images as 4 bytes per pixel


def _check_png_complete(path: Path, png: tuple[int, int, int, int, int]) -> None:
    """Refuse a PNG whose (valid) compressed image data holds fewer rows than its header claims.

    Pillow pads such a file with black; the length of the inflated data is counted here, in
    pieces of 1 MiB (nothing is kept).
    """
    width, height, depth, colour, interlace = png
    bits = depth * _PNG_CHANNELS[colour]

    def row_bytes(w: int) -> int:
        return 1 + (w * bits + 7) // 8

    if interlace:
        passes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7]
        expected = sum(h * row_bytes(w) for w, h in passes if w > 0 and h > 0)
    else:
        expected = height * row_bytes(width)
    inflate, produced = zlib.decompressobj(), 0
    try:
        with open(path, "rb") as f:
            f.seek(8)
            while produced < expected and not inflate.eof:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IEND":
                    break
                if kind != b"IDAT":
                    f.seek(length + 4, os.SEEK_CUR)
                    continue
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC: Pillow checks it
                while data and produced < expected:
                    produced += len(inflate.decompress(data, 1 << 20))
                    data = inflate.unconsumed_tail
    except zlib.error as exc:
        raise FineMaskError(f"corrupt PNG: bad compressed image data ({exc})", path) from None
    if produced < expected:
        detail = f"{produced // row_bytes(width)} of {height} rows" if not interlace else \
            f"{produced:,} of {expected:,} bytes"
        raise FineMaskError(f"truncated PNG: its image data ends after {detail}", path)


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) of an opened PNG/JPEG, read without decoding the pixels (a PNG's
    eXIf chunk counts only before the image data, where Pillow finds it on open)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # Pillow's getexif() would decode a PNG to look for eXIf after the image data
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (H, W[, C]) as displayed for an EXIF ``orientation`` (as ``PIL.ImageOps.exif_transpose``),
    as a view."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return arr[::-1].swapaxes(0, 1)
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return arr[:, ::-1].swapaxes(0, 1)
    return arr
