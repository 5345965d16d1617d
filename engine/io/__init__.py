"""Reading and writing images and label maps, with clear errors for bad files.

Images come back as float32 RGB ``(H, W, 3)`` in [0, 1], whatever they were on disk: TIFF
(8/16-bit, float, gray, RGB, RGBA, channel-first or -last; multi-page takes the first page with a
warning), PNG (8/16-bit, 16-bit colour kept: decoded by libpng through imagecodecs) and JPEG.
PNG and JPEG files are turned as their EXIF orientation says (as photo viewers show them).
Labels are integer class maps ``(H, W)``: uint8/uint16 TIFF (zlib) or palette PNG.

Before decoding, the header is checked against the pixel limit (``$FINEMASK_MAX_PIXELS``) and the
memory the read needs against the memory guard's budget (``engine.memory_guard``): a small file
claiming a huge image is refused without allocating it. A PNG whose image data ends before its
last row is refused as truncated. Every problem is a :class:`~engine.errors.FineMaskError` naming
the file; every write goes through a temporary file and a rename, and a failed write (a full
disk) leaves no file behind.
"""
from __future__ import annotations

from .checks import (
           DEFAULT_MAX_PIXELS,
           IMAGE_SUFFIXES,
           LABEL_SUFFIXES,
           MIN_GUARDED_BYTES,
           max_pixels_limit,
)
from .label_info import LABEL_INFO_KEY, read_label_info
from .pixels import image_from_array, labels_from_array, unit_rgb
from .png_jpeg import EXIF_ORIENTATION
from .readers import image_shape, read_image, read_labels, read_pixels
from .writers import default_palette, write_image, write_labels

__all__ = ["DEFAULT_MAX_PIXELS", "EXIF_ORIENTATION", "IMAGE_SUFFIXES", "LABEL_INFO_KEY", "LABEL_SUFFIXES",
           "MIN_GUARDED_BYTES", "default_palette", "image_from_array", "image_shape", "labels_from_array",
           "max_pixels_limit", "read_image", "read_label_info", "read_labels", "read_pixels", "unit_rgb",
           "write_image", "write_labels"]
