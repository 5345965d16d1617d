"""Reading TIFF pixels (tifffile), with the damage tifffile works around turned into a warning."""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from ..errors import FineMaskError
from .checks import check_memory, check_pixels


def tiff_yx(page: tifffile.TiffPage, path: Path) -> tuple[int, int]:
    """(H, W) of a TIFF page from its axes; a page with axes other than Y, X and samples is refused."""
    axes, shape = page.axes, page.shape
    if "Y" not in axes or "X" not in axes or set(axes) - set("YXS"):
        raise FineMaskError(f"unsupported TIFF layout: axes {axes} with shape {tuple(shape)} (need a 2-D image)", path)
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def read_tiff(path: Path, max_pixels: int | None, labels: bool = False) -> np.ndarray:
    """The first page of a TIFF, channels last, after the pixel and memory checks."""
    try:
        with tifffile_log() as logged, tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise FineMaskError("TIFF holds no image", path)
            if len(tif.series) > 1 or len(tif.pages) > 1:
                warnings.warn(f"{path}: multi-page TIFF, using the first page only", stacklevel=3)
            page = tif.pages[0]
            check_pixels(path, page.shape, max_pixels)
            h, w = tiff_yx(page, path)
            check_memory(path, int(np.prod(page.shape, dtype=np.int64)) * np.dtype(page.dtype).itemsize, h * w,
                          labels)
            arr = page.asarray()
            if page.axes == "SYX":  # planar (channel-first) samples: channels last, whatever the sizes
                arr = np.moveaxis(arr, 0, -1)
            if not labels and arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
                # decided here, where the file says which axis holds the samples
                raise FineMaskError(f"unsupported channel count {arr.shape[-1]} (need 1-4 channels)", path)
            if logged:
                warnings.warn(f"{path}: the TIFF looks damaged ({logged[0]}); check the result", stacklevel=3)
            return arr
    except FineMaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for corrupt files
        if "imagecodecs" in str(exc):  # LZW, JPEG, ... compression: a missing codec, not a bad file
            raise FineMaskError(f"cannot read this TIFF's compression ({exc}): pip install imagecodecs", path) from None
        raise FineMaskError(f"cannot read TIFF: corrupt or truncated file ({exc})", path) from None


class _ThreadRecords(logging.Handler):
    """Keeps the messages a logger emits in one thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def tifffile_log() -> Iterator[list[str]]:
    """Collect the errors tifffile logs while this thread reads a file.

    tifffile logs the damage it works around (bad strip counts, tags pointing past the end of
    the file) instead of raising. Without a handler of ours those lines went to stderr ahead of
    the one-line error of the CLI; collected here, they become part of a warning instead.
    """
    logger = logging.getLogger("tifffile")
    handler = _ThreadRecords()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
