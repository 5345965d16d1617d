"""Reading image and label files: float32 RGB images, integer label maps, and sizes from headers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ..errors import FineMaskError
from .checks import IMAGE_SUFFIXES, LABEL_SUFFIXES, check_file, check_pixels
from .pixels import image_from_array, labels_from_array
from .png_jpeg import exif_orientation, read_pil
from .tiff import read_tiff, tiff_yx, tifffile_log


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as float32 RGB ``(H, W, 3)`` in [0, 1]."""
    path = Path(path)
    return image_from_array(_read_array(path, IMAGE_SUFFIXES, max_pixels), path)


def read_pixels(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """The pixels of an image file as decoded, before :func:`image_from_array`.

    uint8/uint16 (16-bit colour PNGs included), bool or float; (H, W) or (H, W, C) (palette PNGs
    come as RGB/RGBA); EXIF orientation applied. Same checks and errors as :func:`read_image`.
    """
    return _read_array(Path(path), IMAGE_SUFFIXES, max_pixels)


def image_shape(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an image file from its header alone, with the same checks as :func:`read_image`
    (except the memory check: the caller may read the image in parts). PNG and JPEG sizes are
    as displayed: after the EXIF orientation."""
    path = Path(path)
    check_file(path, IMAGE_SUFFIXES)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile_log(), tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise FineMaskError("TIFF holds no image", path)
                shape = tiff_yx(tif.pages[0], path)
        else:
            with Image.open(path) as img:
                shape = (img.height, img.width)
                if exif_orientation(img) in (5, 6, 7, 8):
                    shape = (img.width, img.height)
    except FineMaskError:
        raise
    except UnidentifiedImageError:
        raise FineMaskError("not a readable image: unknown format or wrong file extension", path) from None
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's problem
        raise FineMaskError(f"cannot read image header: corrupt or truncated file ({exc})", path) from None
    check_pixels(path, shape, max_pixels)
    return int(shape[0]), int(shape[1])


def read_labels(
    path: str | Path, *, shape: tuple[int, int] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Read a label map ``(H, W)`` of class indices (uint8 or uint16).

    ``shape`` is the (H, W) of the image the labels belong to; a mismatch is an error.
    """
    path = Path(path)
    arr = _read_array(path, LABEL_SUFFIXES, max_pixels, labels=True)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise FineMaskError(
            f"a label map must have one channel of class indices, found shape {arr.shape}"
            " (colour label images are not supported: save class indices or a palette PNG)",
            path,
        )
    arr = labels_from_array(arr, path)
    if shape is not None and tuple(arr.shape) != tuple(shape[:2]):
        raise FineMaskError(
            f"label shape {arr.shape[0]}x{arr.shape[1]} (HxW) does not match the image "
            f"{shape[0]}x{shape[1]}",
            path,
        )
    return arr


def _read_array(path: Path, suffixes: tuple[str, ...], max_pixels: int | None, labels: bool = False) -> np.ndarray:
    check_file(path, suffixes)
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_tiff(path, max_pixels, labels)
    return read_pil(path, max_pixels, labels)
