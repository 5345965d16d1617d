"""Tiling and bounded-memory resampling for images larger than a model can take at once.

- ``tile_grid``: the CascadePSP local-step grid (L x L tiles, stride L/2 - 2*margin, tiles that
  would stick out are shifted back inside, duplicates dropped) with the region each tile writes
  (``margin`` px trimmed from every edge that is not an image border).
- ``TileAccumulator``: averages overlapping tile outputs with a float32 sum and a uint8 count,
  the only two full-size buffers; pixels no tile wrote get a caller-supplied fallback row strip.
- ``area_resize`` / ``bilinear_region``: resampling that touches the full image one row strip at
  a time, so no full-size float copy of the image (or a float64 one) is ever made.
- ``available_memory``: bytes that can still be allocated on a device.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

STRIP_ROWS = 256
STRIP_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Tile:
    """One tile: crop ``[y0:y1, x0:x1]`` of the image, writing back ``[wy0:wy1, wx0:wx1]``.

    Coordinates are image pixels, end-exclusive. ``index`` is the position in the grid order.
    """

    index: int
    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def crop(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def written(self) -> tuple[slice, slice]:
        return slice(self.wy0, self.wy1), slice(self.wx0, self.wx1)

    @property
    def written_in_tile(self) -> tuple[slice, slice]:
        """The written region in tile coordinates."""
        return (slice(self.wy0 - self.y0, self.wy1 - self.y0), slice(self.wx0 - self.x0, self.wx1 - self.x0))

    def core(self, height: int, width: int, margin: int) -> tuple[int, int, int, int]:
        """The written region shrunk by ``margin`` more on every inner edge: (y0, y1, x0, x1)."""
        y0 = self.wy0 + (margin if self.wy0 > 0 else 0)
        y1 = self.wy1 - (margin if self.wy1 < height else 0)
        x0 = self.wx0 + (margin if self.wx0 > 0 else 0)
        x1 = self.wx1 - (margin if self.wx1 < width else 0)
        return y0, max(y0, y1), x0, max(x0, x1)


def tile_grid(height: int, width: int, size: int, margin: int = 16, step: int | None = None) -> list[Tile]:
    """CascadePSP's local-step grid over an ``height`` x ``width`` image.

    Tiles are ``min(size, height)`` x ``min(size, width)``; starts go in steps of
    ``size // 2 - 2 * margin`` (the reference's stride L/2 with 16 px margins), x-major like the
    reference; a tile past the image end is shifted back to end at the border, and a start seen
    before is skipped. Each tile writes its crop minus ``margin`` px on every side that is not on
    the image border.
    """
    if step is None:
        step = size // 2 - 2 * margin
    if step <= 0:
        raise ValueError(f"tile size {size} is too small for margin {margin} (step would be {step})")
    tiles: list[Tile] = []
    seen: set[tuple[int, int]] = set()
    for ix in range(width // step + 1):
        for iy in range(height // step + 1):
            x0, y0 = ix * step, iy * step
            x1, y1 = x0 + size, y0 + size
            if y1 > height:
                y1, y0 = height, height - size
            if x1 > width:
                x1, x0 = width, width - size
            x0, y0 = max(0, x0), max(0, y0)
            if (y0, x0) in seen:
                continue
            seen.add((y0, x0))
            tiles.append(Tile(
                index=len(tiles), y0=y0, y1=y1, x0=x0, x1=x1,
                wy0=y0 + margin if y0 > 0 else y0, wy1=y1 - margin if y1 < height else y1,
                wx0=x0 + margin if x0 > 0 else x0, wx1=x1 - margin if x1 < width else x1,
            ))
    return tiles


def max_overlap(tiles: list[Tile]) -> int:
    """An upper bound of how many written regions cover one pixel."""
    if not tiles:
        return 0

    def per_axis(spans: set[tuple[int, int]]) -> int:
        edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        best = cur = 0
        for _, d in edges:
            cur += d
            best = max(best, cur)
        return best

    return per_axis({(t.wy0, t.wy1) for t in tiles}) * per_axis({(t.wx0, t.wx1) for t in tiles})


class TileAccumulator:
    """Average of tile outputs over an ``height`` x ``width`` canvas.

    Holds one float32 sum (which becomes the result) and one count array (uint8 while at most 255
    tiles can overlap, else uint16). ``finish`` divides in row strips and fills pixels no tile
    wrote from ``fallback(r0, r1) -> (r1 - r0, width) float32``.
    """

    def __init__(self, height: int, width: int, overlap: int = 255):
        self.sum = np.zeros((height, width), np.float32)
        self.count = np.zeros((height, width), np.uint8 if overlap <= 255 else np.uint16)

    def add(self, tile: Tile, values: np.ndarray) -> None:
        """Add a tile's output (tile-sized, float32) over the tile's written region."""
        rows, cols = tile.written
        self.sum[rows, cols] += values[tile.written_in_tile]
        self.count[rows, cols] += 1

    def finish(self, fallback: Callable[[int, int], np.ndarray] | None = None,
               strip_rows: int = STRIP_ROWS) -> np.ndarray:
        height, _width = self.sum.shape
        for r0 in range(0, height, strip_rows):
            r1 = min(height, r0 + strip_rows)
            s, c = self.sum[r0:r1], self.count[r0:r1]
            covered = c > 0
            np.divide(s, c, out=s, where=covered)
            if fallback is not None and not covered.all():
                np.copyto(s, fallback(r0, r1), where=~covered)
        out = self.sum
        self.sum = self.count = None  # type: ignore[assignment]
        return out


# --------------------------------------------------------------------------------------------
# Resampling one row strip at a time.


def _area_bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-average-pool bins: output i averages inputs [floor(i*n/m), ceil((i+1)*n/m))."""
    i = np.arange(n_out, dtype=np.int64)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def area_resize(array: np.ndarray, out_h: int, out_w: int,
                convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Shrink ``array`` (H, W) or (H, W, C) to (out_h, out_w[, C]) float32 by area averaging.

    Same result as ``F.interpolate(mode="area")`` (adaptive average pooling), computed from row
    strips: ``convert`` maps a strip of input rows to float values (default: ``astype(float64)``),
    so the input may be uint8/uint16/bool and is never copied whole.
    """
    h, w = array.shape[:2]
    convert = convert or (lambda a: a.astype(np.float64))
    ys, ye = _area_bins(h, out_h)
    xs, xe = _area_bins(w, out_w)
    out = np.empty((out_h, out_w) + array.shape[2:], np.float32)
    channels = int(np.prod(array.shape[2:], dtype=np.int64))
    rows_in = max(1, STRIP_ELEMENTS // (w * channels))  # input rows per strip (float64 temporaries)
    per_strip = max(1, (rows_in * out_h) // max(h, 1))
    for o0 in range(0, out_h, per_strip):
        o1 = min(out_h, o0 + per_strip)
        r0, r1 = int(ys[o0]), int(ye[o1 - 1])
        strip = np.asarray(convert(array[r0:r1]), dtype=np.float64)
        # Column bins from a cumulative sum along x (prefix 0 so bin sums are differences).
        cs = np.zeros((strip.shape[0], w + 1) + strip.shape[2:], np.float64)
        np.cumsum(strip, axis=1, out=cs[:, 1:])
        cols = (cs[:, xe] - cs[:, xs]) / (xe - xs).reshape((1, -1) + (1,) * (strip.ndim - 2))
        rs = np.zeros((cols.shape[0] + 1,) + cols.shape[1:], np.float64)
        np.cumsum(cols, axis=0, out=rs[1:])
        a, b = ys[o0:o1] - r0, ye[o0:o1] - r0
        out[o0:o1] = (rs[b] - rs[a]) / (b - a).reshape((-1,) + (1,) * (cols.ndim - 1))
    return out


def _bilinear_axis(n_in: int, n_out: int, start: int, stop: int):
    """Source indices and weights of ``F.interpolate(bilinear, align_corners=False)`` along one axis."""
    scale = n_in / n_out
    src = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(1 - w1), torch.from_numpy(w1)


def bilinear_region(low: torch.Tensor, out_size: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows`` x cols ``cols`` of ``low`` (h, w) bilinearly resized to ``out_size``.

    Equals ``F.interpolate(low[None, None], size=out_size, mode="bilinear",
    align_corners=False)[0, 0, r0:r1, c0:c1]`` up to float rounding, without building the full
    output. Returns float32 on ``low``'s device.
    """
    h, w = low.shape
    low = low.float()
    y0, y1, wy0, wy1 = (t.to(low.device) for t in _bilinear_axis(h, out_size[0], *rows))
    x0, x1, wx0, wx1 = (t.to(low.device) for t in _bilinear_axis(w, out_size[1], *cols))
    r = low[y0] * wy0[:, None] + low[y1] * wy1[:, None]
    return r[:, x0] * wx0 + r[:, x1] * wx1


def source_span(n_in: int, n_out: int, start: int, stop: int) -> tuple[int, int]:
    """Range [a, b) of low-resolution indices that bilinear output ``[start, stop)`` reads."""
    i0, i1, _, _ = _bilinear_axis(n_in, n_out, start, stop)
    return int(i0.min()), int(i1.max()) + 1


# --------------------------------------------------------------------------------------------
# Memory.


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: free device memory; CPU:
    MemAvailable, capped by a cgroup limit when one is set)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    return max(0, int(avail))
