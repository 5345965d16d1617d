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

import contextlib
import errno
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFile, UnidentifiedImageError

from .atomic import atomic_path
from .errors import FineMaskError

#: Default upper bound on pixels per image (16384 x 16384); ``FINEMASK_MAX_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = 16384 * 16384
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
#: Key of the class names and palette in a label file (TIFF description JSON, PNG text chunk).
LABEL_INFO_KEY = "finemask"
#: File format by suffix, and the first bytes each format starts with (TIFF: both byte orders,
#: classic and BigTIFF). A file whose first bytes do not fit its suffix is refused before decoding.
_FORMAT_OF_SUFFIX = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
_SUFFIX_OF_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}

#: Reads needing less memory than this are never refused by the memory check (the guard is for
#: images that could exhaust memory; the jobs that follow a read plan their own memory).
MIN_GUARDED_BYTES = 64 << 20
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


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else ``$FINEMASK_MAX_PIXELS``, else the default."""
    if max_pixels is not None:
        return int(max_pixels)
    env = os.environ.get("FINEMASK_MAX_PIXELS")
    return int(env) if env else DEFAULT_MAX_PIXELS


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
    _check_file(path, IMAGE_SUFFIXES)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with _tifffile_log(), tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise FineMaskError("TIFF holds no image", path)
                shape = _tiff_yx(tif.pages[0], path)
        else:
            with Image.open(path) as img:
                shape = (img.height, img.width)
                if _orientation(img) in (5, 6, 7, 8):
                    shape = (img.width, img.height)
    except FineMaskError:
        raise
    except UnidentifiedImageError:
        raise FineMaskError("not a readable image: unknown format or wrong file extension", path) from None
    except Exception as exc:
        raise FineMaskError(f"cannot read image header: corrupt or truncated file ({exc})", path) from None
    _check_pixels(path, shape, max_pixels)
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


def labels_from_array(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Check a class-index array and return it as uint8 or uint16 (H, W)."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or 0 in arr.shape:
        raise FineMaskError(f"a label map must be a non-empty 2-D array, found shape {arr.shape}", path)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            arr = arr.astype(np.int64)
        else:
            raise FineMaskError(f"unsupported label dtype {arr.dtype}: labels must be integer class ids", path)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise FineMaskError(f"class ids must lie in 0..65535, found {lo}..{hi}", path)
    return arr.astype(np.uint8 if hi < 256 else np.uint16)


def image_from_array(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Normalise an image array to float32 RGB ``(H, W, 3)`` in [0, 1].

    Accepts (H, W), (H, W, C) or channel-first (C, H, W) with C in 1..4 (2 = gray + alpha,
    4 = RGBA; alpha is dropped); uint8, uint16, bool, or float already in [0, 1].
    """
    arr = np.asarray(arr)
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise FineMaskError(f"not a 2-D image: array shape {arr.shape}", path)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        raise FineMaskError(
            f"unsupported channel count: array shape {arr.shape} has no axis of 1-4 channels (first or last)", path
        )
    if min(arr.shape[:2]) < 1:
        raise FineMaskError(f"image has zero size {arr.shape}", path)
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    elif arr.dtype == bool:
        scale = 1.0
    elif arr.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise FineMaskError("image contains NaN or infinite values", path)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise FineMaskError(f"float image values must lie in [0, 1], found {lo:g}..{hi:g}", path)
        scale = 1.0
    else:
        raise FineMaskError(f"unsupported pixel type {arr.dtype} (use 8/16-bit integers or float in [0, 1])", path)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[-1]
    if channels in (2, 4):
        arr = arr[..., : channels - 1]  # alpha dropped (a view)
    # One float32 result, written in place: gray is broadcast to 3 channels, no intermediate copies.
    out = np.empty((arr.shape[0], arr.shape[1], 3), np.float32)
    np.divide(arr, np.float32(scale), out=out, casting="unsafe")
    return out


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
    info = _label_info_json(classes, palette)
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


def read_label_info(path: str | Path) -> dict[str, list]:
    """Class names and palette a label file carries (:func:`write_labels`): ``{"classes": [...],
    "palette": [[r, g, b], ...]}`` with the keys present; ``{}`` for a file without them.

    A PNG's palette counts only with its names (every palette PNG has 256 colours)."""
    import json

    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with _tifffile_log(), tifffile.TiffFile(path) as tif:
                text = tif.pages[0].description if tif.pages else ""
        else:
            with Image.open(path) as img:
                text = img.text.get(LABEL_INFO_KEY, "") if hasattr(img, "text") else ""
                flat = img.getpalette() if img.mode == "P" else None
    except Exception:  # noqa: BLE001 - an unreadable file carries nothing; reading it says why
        return {}
    try:
        data = json.loads(text).get(LABEL_INFO_KEY) if text.lstrip().startswith("{") else None
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, list] = {}
    classes = data.get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        out["classes"] = list(classes)
    palette = data.get("palette")
    if path.suffix.lower() == ".png" and "classes" in out and flat:
        palette = [flat[3 * i: 3 * i + 3] for i in range(min(len(out["classes"]), len(flat) // 3))]
    if isinstance(palette, list) and all(isinstance(c, list) and len(c) == 3 and
                                         all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette):
        out["palette"] = [list(c) for c in palette]
    return out


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


# --- internals -------------------------------------------------------------------------------


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


def _label_info_json(classes: list[str] | None, palette: list[list[int]] | None) -> str:
    """The ``finemask`` JSON of a label file ("" when there is nothing to carry); 7-bit ASCII."""
    import json

    info: dict[str, list] = {}
    if classes:
        info["classes"] = [str(c) for c in classes]
    if palette:
        info["palette"] = [[int(v) for v in c[:3]] for c in palette]
    return json.dumps({LABEL_INFO_KEY: info}, ensure_ascii=True) if info else ""


def _palette_bytes(palette: list[list[int]] | None) -> list[int]:
    pal = [list(map(int, c[:3])) for c in (palette or [])]
    pal += default_palette(256)[len(pal):]
    return [v for c in pal[:256] for v in c]


def _check_file(path: Path, suffixes: tuple[str, ...]) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FineMaskError("symlink loop: following its links never reaches a file", path) from None
        if path.is_symlink():
            raise FineMaskError(f"broken symbolic link: its target {os.readlink(path)} does not exist", path) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FineMaskError("file not found", path) from None
        raise FineMaskError(f"cannot read the file ({exc.strerror or exc})", path) from None
    if not path.is_file():
        raise FineMaskError("not a file", path)
    if path.stat().st_size == 0:
        raise FineMaskError("file is empty (0 bytes)", path)
    if path.suffix.lower() not in suffixes:
        raise FineMaskError(f"unsupported file type {path.suffix!r} (supported: {', '.join(suffixes)})", path)
    _check_signature(path)


def _check_signature(path: Path) -> None:
    """Refuse a file whose first bytes are not those of the format its suffix names.

    Decoders would otherwise guess (Pillow opens a JPEG named .png) or fail with misleading
    messages (tifffile calls a PNG named .tif corrupt); a label map must never be read from a
    lossy JPEG that happens to be named .png.
    """
    expected = _FORMAT_OF_SUFFIX[path.suffix.lower()]
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise FineMaskError(f"cannot read the file ({exc.strerror or exc})", path) from None
    if head.startswith(_SIGNATURES[expected]):
        return
    actual = next((fmt for fmt, sigs in _SIGNATURES.items() if head.startswith(sigs)), None)
    if actual is not None:
        raise FineMaskError(
            f"the file holds {actual} data but its name ends in {path.suffix}: wrong file extension "
            f"(rename it to {_SUFFIX_OF_FORMAT[actual]})",
            path,
        )
    raise FineMaskError(
        f"not a readable image: the file does not start like a {expected} file (unknown format or wrong file "
        "extension)",
        path,
    )


def _tiff_yx(page: tifffile.TiffPage, path: Path) -> tuple[int, int]:
    """(H, W) of a TIFF page from its axes; a page with axes other than Y, X and samples is refused."""
    axes, shape = page.axes, page.shape
    if "Y" not in axes or "X" not in axes or set(axes) - set("YXS"):
        raise FineMaskError(f"unsupported TIFF layout: axes {axes} with shape {tuple(shape)} (need a 2-D image)", path)
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _check_pixels(path: Path, shape: tuple[int, ...], max_pixels: int | None) -> None:
    limit = max_pixels_limit(max_pixels)
    dims = [int(d) for d in shape]
    if any(d <= 0 for d in dims):
        raise FineMaskError(f"image has zero size {tuple(dims)}", path)
    # Height and width are the two largest dimensions (channels and pages are small).
    h, w = sorted(dims)[-2:] if len(dims) >= 2 else (dims[0], 1)
    if h * w > limit:
        raise FineMaskError(
            f"image has {h * w:,} pixels, more than the limit of {limit:,} (set FINEMASK_MAX_PIXELS to a larger "
            "number of pixels to allow larger images)", path)


def _check_memory(path: Path, decoded_bytes: int, pixels: int, labels: bool) -> None:
    """Refuse a read whose peak memory (file + decoded pixels twice + the float32 RGB result)
    exceeds the memory guard's budget, from the header, before anything is decoded."""
    from . import memory_guard  # imports torch: only when an image is read

    result = 0 if labels else pixels * 3 * 4
    need = path.stat().st_size + 2 * int(decoded_bytes) + result
    if need < MIN_GUARDED_BYTES:
        return
    usable = int(memory_guard.free_bytes("cpu") * memory_guard.FRACTION)
    if need <= usable:
        return
    limit = memory_guard.memory_limit()
    hint = ("raise FINEMASK_MEMORY_LIMIT (now {}) or".format(_size(limit)) if limit is not None else
            "close other programs to free memory, set FINEMASK_MEMORY_LIMIT only as high as the machine allows, or")
    raise memory_guard.MemoryBudgetError(
        f"reading this {pixels:,}-pixel image needs about {_size(need)} of memory but only {_size(usable)} can be "
        f"used now; {hint} use a smaller image", path)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def _read_array(path: Path, suffixes: tuple[str, ...], max_pixels: int | None, labels: bool = False) -> np.ndarray:
    _check_file(path, suffixes)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path, max_pixels, labels)
    return _read_pil(path, max_pixels, labels)


def _read_tiff(path: Path, max_pixels: int | None, labels: bool = False) -> np.ndarray:
    try:
        with _tifffile_log() as logged, tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise FineMaskError("TIFF holds no image", path)
            if len(tif.series) > 1 or len(tif.pages) > 1:
                warnings.warn(f"{path}: multi-page TIFF, using the first page only", stacklevel=3)
            page = tif.pages[0]
            _check_pixels(path, page.shape, max_pixels)
            h, w = _tiff_yx(page, path)
            _check_memory(path, int(np.prod(page.shape, dtype=np.int64)) * np.dtype(page.dtype).itemsize, h * w,
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
    except Exception as exc:  # tifffile raises many types for corrupt files
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
def _tifffile_log() -> Iterator[list[str]]:
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


def _read_pil(path: Path, max_pixels: int | None, labels: bool) -> np.ndarray:
    """A PNG or JPEG: header, pixel limit and memory checked by Pillow's lazy open, then decoded
    (images' PNGs by libpng, which keeps 16-bit colour and refuses short image data; label PNGs
    by Pillow, palette indices kept, after a check of the image data's length), then oriented."""
    try:
        with Image.open(path) as img:
            _check_pixels(path, (img.height, img.width), max_pixels)
            orientation = _orientation(img)
            png = _png_header(path) if img.format == "PNG" else None
            _check_memory(path, _decoded_bytes(img, png, labels), img.height * img.width, labels)
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
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError for damaged files
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


def _orientation(img: Image.Image) -> int:
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
