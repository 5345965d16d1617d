"""Checks made before a file is decoded: it exists, its first bytes fit its suffix, and its
header's pixel count and the memory the read needs are within limits."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import FineMaskError

#: Default upper bound on pixels per image (16384 x 16384); ``FINEMASK_MAX_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = 16384 * 16384
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
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


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else ``$FINEMASK_MAX_PIXELS``, else the default."""
    if max_pixels is not None:
        return int(max_pixels)
    env = os.environ.get("FINEMASK_MAX_PIXELS")
    return int(env) if env else DEFAULT_MAX_PIXELS


def check_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """Refuse a path that is no readable, non-empty file of one of ``suffixes`` with fitting first bytes."""
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


def check_pixels(path: Path, shape: tuple[int, ...], max_pixels: int | None) -> None:
    """Refuse an image of zero size or with more pixels than the limit in force."""
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


def check_memory(path: Path, decoded_bytes: int, pixels: int, labels: bool) -> None:
    """Refuse a read whose peak memory (file + decoded pixels twice + the float32 RGB result)
    exceeds the memory guard's budget, from the header, before anything is decoded."""
    from .. import memory_guard  # imports torch: only when an image is read

    result = 0 if labels else pixels * 3 * 4
    need = path.stat().st_size + 2 * int(decoded_bytes) + result
    if need < MIN_GUARDED_BYTES:
        return
    usable = int(memory_guard.free_bytes("cpu") * memory_guard.FRACTION)
    if need <= usable:
        return
    limit = memory_guard.memory_limit()
    hint = (f"raise FINEMASK_MEMORY_LIMIT (now {_size(limit)}) or" if limit is not None else
            "close other programs to free memory, set FINEMASK_MEMORY_LIMIT only as high as the machine allows, or")
    raise memory_guard.MemoryBudgetError(
        f"reading this {pixels:,}-pixel image needs about {_size(need)} of memory but only {_size(usable)} can be "
        f"used now; {hint} use a smaller image", path)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"
