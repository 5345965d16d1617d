"""Hypothesis strategies that make bad image and label files.

Every strategy draws a :class:`BadFile`: a file name, its bytes and what is wrong with it. Tests
write it into a fresh folder (:meth:`BadFile.write`) and hand the path to a surface (engine.io,
the store, the CLI, the napari reader, the web app). What a surface must do with it:

- ``problem`` (a regular expression) set: refuse it with a FineMaskError naming the file whose
  text matches ``problem``;
- ``original`` set (damage that may leave the image data intact, e.g. a cut in the trailing
  end-of-file chunk): refuse it, or read exactly what ``original`` reads as;
- ``may_read`` (damage no file format can detect, e.g. a flipped byte in JPEG quantisation
  tables): refuse it, or read a well-formed result.

Files are small (at most 64 x 64 pixels) except for the headers of decompression bombs, which
claim far more pixels than they hold.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from hypothesis import strategies as st
from PIL import Image

MAX_SIDE = 64
#: What a file's first bytes look like, per format (what a wrong extension is detected from).
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff", "tif": b"II*\x00"}
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SUFFIX_OF = {"png": ".png", "jpg": ".jpg", "tif": ".tif"}
#: A palette for palette PNGs: 256 gray levels.
PALETTE = [v for i in range(256) for v in (i, i, i)]
#: Pixel types an image may not have (engine.io reads uint8, uint16, bool and float in [0, 1]).
UNSUPPORTED_IMAGE_DTYPES = ("int8", "int16", "int32", "int64", "uint32", "uint64", "complex64", "complex128")
FLOAT_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class BadFile:
    """A file to write: ``name`` (with suffix), ``data``, the ``kind`` of flaw (for statistics)
    and the flaw in words."""

    name: str
    data: bytes
    kind: str
    flaw: str
    problem: str | None = None
    original: bytes | None = None
    may_read: bool = False

    def write(self, folder: Path) -> Path:
        path = Path(folder) / self.name
        path.write_bytes(self.data)
        return path

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"BadFile({self.name!r}, {len(self.data)} bytes, {self.flaw})"


# --- valid files (the material that gets damaged) ----------------------------------------------


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    """``array`` as PNG, JPEG or TIFF bytes (TIFF keeps any dtype and layout tifffile writes)."""
    buf = io.BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buf, array, **options)
    elif "palette" in options:  # a palette ("P") PNG of uint8 class ids
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array, np.uint8).tobytes())
        img.putpalette(options["palette"])
        img.save(buf, format="PNG")
    else:
        Image.fromarray(array).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
    return buf.getvalue()


def sides(min_side: int = 1, max_side: int = MAX_SIDE) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))


@st.composite
def image_arrays(draw, dtype: str | None = None, channels: int | None = None, min_side: int = 1) -> np.ndarray:
    """uint8 or uint16 (H, W) or (H, W, C) arrays, C in 1..4, sides up to MAX_SIDE."""
    h, w = draw(sides(min_side))
    dtype = dtype or draw(st.sampled_from(["uint8", "uint16"]))
    c = channels if channels is not None else draw(st.sampled_from([0, 1, 3, 4]))
    shape = (h, w) if c == 0 else (h, w, c)
    seed = draw(st.integers(0, 2**32 - 1))
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, size=shape, dtype=dtype)


@st.composite
def valid_image_files(draw) -> tuple[str, bytes]:
    """(format, bytes) of a readable image: PNG (8/16-bit gray, RGB, RGBA), JPEG, TIFF."""
    fmt = draw(st.sampled_from(["png", "jpg", "tif"]))
    if fmt == "jpg":
        arr = draw(image_arrays("uint8", draw(st.sampled_from([0, 3])), min_side=2))
        return fmt, encode(arr, fmt)
    if fmt == "png":
        kind = draw(st.sampled_from(["L", "RGB", "RGBA", "I;16"]))
        channels = {"L": 0, "I;16": 0, "RGB": 3, "RGBA": 4}[kind]
        arr = draw(image_arrays("uint16" if kind == "I;16" else "uint8", channels))
        return fmt, encode(arr, fmt)
    arr = draw(image_arrays())
    compression = draw(st.sampled_from([None, "zlib"]))
    rows = draw(st.sampled_from([None, 1, 4]))
    return fmt, encode(arr, fmt, compression=compression, rowsperstrip=rows, photometric=_photometric(arr))


@st.composite
def valid_label_files(draw) -> tuple[str, bytes]:
    """(format, bytes) of a readable label map: palette PNG or uint8/uint16 zlib TIFF."""
    h, w = draw(sides())
    seed = draw(st.integers(0, 2**32 - 1))
    fmt = draw(st.sampled_from(["png", "tif"]))
    top = 255 if fmt == "png" else draw(st.sampled_from([255, 65535]))
    labels = np.random.default_rng(seed).integers(0, min(top, 20) + 1, size=(h, w))
    if fmt == "png":
        return fmt, encode(labels.astype(np.uint8), "png", palette=PALETTE)
    dtype = np.uint8 if top == 255 else np.uint16
    return fmt, encode(labels.astype(dtype), "tif", compression="zlib", photometric="minisblack")


def looks_like(data: bytes, fmt: str) -> bool:
    """Whether ``data`` starts with the signature of ``fmt`` ("png", "jpg", "tif")."""
    return data[:4] in TIFF_SIGNATURES if fmt == "tif" else data.startswith(SIGNATURES[fmt])


def _photometric(arr: np.ndarray) -> str:
    return "rgb" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else "minisblack"


def _valid(kind: str) -> st.SearchStrategy[tuple[str, bytes]]:
    return valid_image_files() if kind == "image" else valid_label_files()


# --- damaged files -------------------------------------------------------------------------------


@st.composite
def truncated_files(draw, kind: str = "image") -> BadFile:
    """A valid file cut at a random point (1 .. size-1 bytes kept)."""
    fmt, data = draw(_valid(kind))
    cut = draw(st.integers(1, len(data) - 1))
    return BadFile(f"cut{SUFFIX_OF[fmt]}", data[:cut], "truncated", f"{fmt} cut to {cut} of {len(data)} bytes",
                   original=data)


@st.composite
def header_flips(draw, kind: str = "image") -> BadFile:
    """A valid file with 1-4 random bytes changed within its first 64 bytes (the header)."""
    fmt, data = draw(_valid(kind))
    bad = bytearray(data)
    positions = draw(st.lists(st.integers(0, min(63, len(data) - 1)), min_size=1, max_size=4, unique=True))
    for pos in positions:
        bad[pos] ^= draw(st.integers(1, 255))
    return BadFile(f"flipped{SUFFIX_OF[fmt]}", bytes(bad), "header bytes changed",
                   f"{fmt} with bytes {positions} changed", original=data, may_read=True)


@st.composite
def wrong_magic_files(draw, kind: str = "image") -> BadFile:
    """Content of one kind under another's name: a JPEG named .png, a PNG named .tif, text named .tif..."""
    named = draw(st.sampled_from(["png", "tif"] if kind == "labels" else ["png", "jpg", "tif"]))
    content = draw(st.sampled_from(["png", "jpg", "tif", "text", "html", "random"]).filter(lambda c: c != named))
    if content in SIGNATURES:
        arr = draw(image_arrays("uint8", draw(st.sampled_from([0, 3])), min_side=2))
        data = encode(arr, content)
        problem = "wrong file extension"
    elif content == "text":
        data = draw(st.text(min_size=1, max_size=200)).encode("utf-8")
        problem = "not a readable image"
    elif content == "html":
        data = b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"
        problem = "not a readable image"
    else:
        data = draw(st.binary(min_size=1, max_size=300))
        problem = "not a readable image|wrong file extension"
    if looks_like(data, named):
        problem = None  # starts like the format its name says: the decoder finds the damage, any message
    elif any(looks_like(data, fmt) for fmt in SIGNATURES):
        problem = "wrong file extension"
    return BadFile(f"mislabelled{SUFFIX_OF[named]}", data, "wrong magic bytes", f"{content} content named .{named}",
                   problem=problem)


@st.composite
def empty_files(draw, kind: str = "image") -> BadFile:
    suffix = draw(st.sampled_from([".png", ".tif", ".tiff"] + ([".jpg", ".jpeg"] if kind == "image" else [])))
    return BadFile(f"empty{suffix}", b"", "0 bytes", "0 bytes", problem="empty")


# --- PNGs whose image data ends early (valid chunks, CRCs and zlib stream) -------------------------

#: Channels per PNG colour type; (colour type, bit depth) pairs an image / a label PNG may have.
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
IMAGE_PNG_TYPES = [(0, 8), (0, 16), (2, 8), (2, 16), (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)]
LABEL_PNG_TYPES = [(0, 8), (0, 16), (3, 8)]
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and a valid CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_row_lengths(width: int, height: int, colour: int = 2, depth: int = 8, interlace: int = 0) -> list[int]:
    """Bytes of each filtered row (filter byte included) in the order the image data holds them
    (Adam7 passes one after the other when interlaced)."""
    bits = depth * PNG_CHANNELS[colour]
    if not interlace:
        return [1 + (width * bits + 7) // 8] * height
    rows = []
    for x0, y0, dx, dy in _ADAM7:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            rows += [1 + (w * bits + 7) // 8] * h
    return rows


def png_with_data(width: int, height: int, *, colour: int = 2, depth: int = 8, interlace: int = 0,
                  keep: int | None = None, seed: int = 0) -> bytes:
    """A PNG of random pixels (filter 0 on every row) whose zlib stream holds the first ``keep``
    bytes of its filtered rows (None: all of them): with ``keep`` short of the total, a file with
    valid chunks, CRCs and compressed data whose image data ends before the last row."""
    rng = np.random.default_rng(seed)
    raw = bytearray()
    for n in png_row_lengths(width, height, colour, depth, interlace):
        raw += b"\0" + rng.integers(0, 256, n - 1, dtype=np.uint8).tobytes()
    raw = bytes(raw if keep is None else raw[:keep])
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    palette = png_chunk(b"PLTE", bytes(PALETTE)) if colour == 3 else b""
    return (SIGNATURES["png"] + png_chunk(b"IHDR", ihdr) + palette + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


@st.composite
def short_png_files(draw, kind: str = "image") -> BadFile:
    """A PNG whose (valid) compressed image data ends early: 0 .. all but one byte of its rows,
    interlaced or not, any colour type and bit depth an image (or a label map) may have."""
    colour, depth = draw(st.sampled_from(IMAGE_PNG_TYPES if kind == "image" else LABEL_PNG_TYPES))
    width, height = draw(sides(8))
    interlace = draw(st.sampled_from([0, 1]))
    total = sum(png_row_lengths(width, height, colour, depth, interlace))
    keep = draw(st.integers(0, total - 1))
    data = png_with_data(width, height, colour=colour, depth=depth, interlace=interlace, keep=keep,
                         seed=draw(st.integers(0, 2**16)))
    laced = "interlaced " if interlace else ""
    return BadFile("short.png", data, "image data short",
                   f"{laced}{width}x{height} PNG (type {colour}, {depth}-bit) with {keep} of {total} bytes of rows",
                   problem="truncated")


# --- decompression bombs: headers that claim far more pixels than the file holds -----------------


def png_bomb(width: int, height: int, color_type: int = 2, bit_depth: int = 8) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid checksums) with a tiny IDAT."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (SIGNATURES["png"] + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 256))
            + chunk(b"IEND", b""))


def tiff_bomb(width: int, height: int, *, samples: int = 1, bits: int = 8, compressed: bool = True) -> bytes:
    """A classic little-endian TIFF whose ImageWidth/ImageLength claim ``width`` x ``height``,
    with one strip of a few (deflated) bytes."""
    strip = zlib.compress(b"\0" * 1024) if compressed else b"\0" * 16
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 8 if compressed else 1),
            (262, 3, 1, 2 if samples >= 3 else 1), (273, 4, 1, 0), (277, 3, 1, samples),
            (278, 4, 1, height), (279, 4, 1, len(strip))]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags)))
    for tag, typ, count, value in tags:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    return bytes(out + struct.pack("<I", 0) + strip)


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to claim ``width`` x ``height`` (< 65536)."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8), "jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@st.composite
def bomb_files(draw, limit: int, kind: str = "image") -> BadFile:
    """A header claiming more than ``limit`` pixels (up to 100000 x 100000 and beyond), almost no data."""
    fmt = draw(st.sampled_from(["png", "tif"] if kind == "labels" else ["png", "tif", "jpg"]))
    top = 65535 if fmt == "jpg" else 200_000
    width = draw(st.integers(limit // top + 1, top))
    height = draw(st.integers(limit // width + 1, top))
    if fmt == "png":
        data = png_bomb(width, height, color_type=0 if kind == "labels" else draw(st.sampled_from([0, 2, 6])))
    elif fmt == "tif":
        data = tiff_bomb(width, height, samples=1 if kind == "labels" else draw(st.sampled_from([1, 3])),
                         compressed=draw(st.booleans()))
    else:
        data = jpeg_bomb(width, height)
    assert width * height > limit
    return BadFile(f"bomb{SUFFIX_OF[fmt]}", data, "decompression bomb", f"{fmt} header claiming {width} x {height}",
                   problem="more than the limit")


# --- pixel types, channels and values an image may not have ---------------------------------------


@st.composite
def unsupported_dtype_images(draw) -> BadFile:
    """A TIFF image of a pixel type FineMask does not read (signed ints, 32/64-bit ints, complex)."""
    dtype = draw(st.sampled_from(UNSUPPORTED_IMAGE_DTYPES))
    h, w = draw(sides())
    arr = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 100, size=(h, w)).astype(dtype)
    return BadFile("odd_type.tif", encode(arr, "tif"), "unsupported dtype", f"{dtype} {h}x{w} TIFF",
                   problem="pixel type")


@st.composite
def bad_channel_images(draw) -> BadFile:
    """A TIFF with 5-8 channels, channels-last (contiguous) or channel-first (planar)."""
    channels = draw(st.integers(5, 8))
    h, w = draw(sides())
    planar = draw(st.booleans())
    shape = (channels, h, w) if planar else (h, w, channels)
    arr = np.zeros(shape, np.uint8)
    data = encode(arr, "tif", photometric="minisblack", planarconfig="separate" if planar else "contig")
    layout = "planar" if planar else "contiguous"
    return BadFile("channels.tif", data, "channel count", f"{channels} channels, {layout}, {h}x{w}", problem="channel")


@st.composite
def nonfinite_float_images(draw) -> BadFile:
    """A float TIFF in [0, 1] with NaN, +inf or -inf somewhere."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    h, w = draw(sides())
    c = draw(st.sampled_from([0, 3]))
    arr = np.random.default_rng(draw(st.integers(0, 2**16))).random((h, w, c) if c else (h, w)).astype(dtype)
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    flat = arr.reshape(-1)
    for i in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=5)):
        flat[i] = value
    return BadFile("nonfinite.tif", encode(arr, "tif", photometric=_photometric(arr)), "NaN/inf",
                   f"{dtype} with {value}",
                   problem="NaN or infinite")


@st.composite
def out_of_range_float_images(draw) -> BadFile:
    """A finite float TIFF with some value outside [0, 1]."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    h, w = draw(sides())
    arr = np.random.default_rng(draw(st.integers(0, 2**16))).random((h, w)).astype(dtype)
    arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(
        st.one_of(st.floats(1.01, 60000.0), st.floats(-60000.0, -0.01)))
    return BadFile("range.tif", encode(arr, "tif"), "float outside [0, 1]", f"{dtype} outside [0, 1]",
                   problem=r"\[0, 1\]")


def bad_image_files(limit: int) -> st.SearchStrategy[BadFile]:
    """Any image file that must be refused (or, when damaged, at worst read as it was)."""
    return st.one_of(
        truncated_files("image"), header_flips("image"), wrong_magic_files("image"), empty_files("image"),
        bomb_files(limit, "image"), unsupported_dtype_images(), bad_channel_images(), nonfinite_float_images(),
        out_of_range_float_images(), short_png_files("image"),
    )


# --- label maps --------------------------------------------------------------------------------


@st.composite
def bad_label_values(draw) -> BadFile:
    """A label TIFF whose values are no class ids: negative, above 65535, fractional, NaN, complex."""
    h, w = draw(sides())
    what = draw(st.sampled_from(["negative", "too_big", "fraction", "nan", "complex"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = {"negative": "int16", "too_big": "uint32", "fraction": "float32", "nan": "float64", "complex": "complex64"}
    arr = rng.integers(0, 5, size=(h, w)).astype(dtype[what])
    i = draw(st.integers(0, arr.size - 1))
    arr.reshape(-1)[i] = {"negative": draw(st.integers(-32768, -1)), "too_big": draw(st.integers(65536, 2**32 - 1)),
                          "fraction": 0.5, "nan": np.nan, "complex": 1 + 1j}[what]
    problem = "class ids|label dtype|integer class"
    return BadFile("values.tif", encode(arr, "tif"), "not class ids", f"labels {what} ({arr.dtype})", problem=problem)


@st.composite
def bad_label_layouts(draw) -> BadFile:
    """Colour or multi-channel label files: RGB/RGBA/gray+alpha PNG, 2-7 channel TIFF."""
    h, w = draw(sides())
    if draw(st.booleans()):
        mode, c = draw(st.sampled_from([("RGB", 3), ("RGBA", 4), ("LA", 2)]))
        data = encode(np.zeros((h, w, c), np.uint8), "png")
        return BadFile("colour.png", data, "colour labels", f"{mode} PNG labels", problem="palette or gray|one channel")
    c = draw(st.integers(2, 7))
    data = encode(np.zeros((h, w, c), np.uint8), "tif", photometric="minisblack", planarconfig="contig")
    return BadFile("channels.tif", data, "multi-channel labels", f"{c}-channel TIFF labels", problem="one channel")


def bad_label_files(limit: int) -> st.SearchStrategy[BadFile]:
    """Any label file that must be refused (or, when damaged, at worst read as it was)."""
    return st.one_of(
        truncated_files("labels"), header_flips("labels"), wrong_magic_files("labels"), empty_files("labels"),
        bomb_files(limit, "labels"), bad_label_values(), bad_label_layouts(), short_png_files("labels"),
    )


@st.composite
def labels_beyond(draw, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """A class map of ``shape`` with at least one id >= ``num_classes`` that is not 255 (ignore)."""
    dtype = draw(st.sampled_from(["uint8", "uint16"]))
    top = np.iinfo(dtype).max
    bad = draw(st.integers(num_classes, top).filter(lambda v: v != 255))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    labels = rng.integers(0, num_classes, size=shape).astype(dtype)
    for i in draw(st.lists(st.integers(0, labels.size - 1), min_size=1, max_size=4)):
        labels.reshape(-1)[i] = bad
    return labels


@st.composite
def other_shapes(draw, shape: tuple[int, int]) -> tuple[int, int]:
    """An (H, W) different from ``shape`` (transposed, one pixel off, or anything else small)."""
    h, w = shape
    choice = draw(st.one_of(st.just((w, h)), st.just((h + 1, w)), st.just((h, w - 1)), sides()))
    return choice if choice != tuple(shape) and min(choice) > 0 else (h + 2, w)


def label_file(labels: np.ndarray, fmt: str) -> bytes:
    """``labels`` (uint8/uint16) as a palette PNG (uint8 only) or a zlib TIFF."""
    if fmt == "png":
        return encode(labels.astype(np.uint8), "png", palette=PALETTE)
    return encode(labels, "tif", compression="zlib", photometric="minisblack")
