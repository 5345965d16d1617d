"""Corrections painted in the web editor, turned into class labels at full resolution.

The browser editor paints on a transparent layer over a preview of the image (the image with
its class colours blended in). Each class has its own opaque brush colour; the eraser removes
paint. A painted pixel therefore says "this pixel is class k" and an unpainted one "no change".

Images larger than the editor can handle quickly are shown downscaled (``preview``). A stroke
on the preview covers blocks of full-resolution pixels, so its edges are only as precise as the
preview. Mapping back (:func:`apply_strokes`): strokes are upsampled (nearest) to full
resolution inside their bounding box, and, when a refiner is given, the refiner is run on that
region of the edited labels; its result is accepted only in a band one preview pixel wide
around the strokes' edges, where the blocky upsampled edge is uncertain, so stroke interiors
keep the class the user painted and everything away from the strokes stays as it was.

Brushes are opaque on purpose: the editor composites semi-transparent strokes of different
colours into mixed colours, which could not be mapped back to one class.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .render import nearest_indices

#: Layer alpha from which a pixel counts as painted (the editor writes 255 for opaque brushes).
PAINTED_ALPHA = 128
#: Largest per-channel difference between a painted colour and the nearest brush colour.
COLOUR_TOLERANCE = 40
#: Extra full-resolution pixels around the strokes' box given to the refiner as context.
CONTEXT_PX = 16


@dataclass
class EditResult:
    """Labels after applying strokes. ``changed``: pixels whose class changed; ``box``: (y0, y1,
    x0, x1) of the region the edit touched at full resolution, or None; ``snapped``: whether the
    refiner re-snapped stroke edges."""

    labels: np.ndarray
    changed: int
    box: tuple[int, int, int, int] | None
    snapped: bool


def brush_colours(palette: list[list[int]], num_classes: int) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per class: the palette's, nudged where two classes share one."""
    seen: set[tuple[int, int, int]] = set()
    out = []
    for k in range(num_classes):
        r, g, b = (list(palette[k])[:3] if k < len(palette) else [(37 * k) % 256, (91 * k) % 256, (53 * k) % 256])
        colour = (int(r), int(g), int(b))
        step = 0
        while colour in seen:  # shift away from the duplicate, staying in 0..255
            step += 1
            colour = tuple(int(v + 17 * step) % 256 for v in (r, g, b))  # type: ignore[assignment]
        seen.add(colour)
        out.append(colour)
    return out


def css_colour(colour: tuple[int, int, int]) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


def strokes_from_layers(layers: list[np.ndarray], colours: list[tuple[int, int, int]],
                        shape: tuple[int, int]) -> np.ndarray:
    """Editor layers (h, w, 4) uint8 RGBA -> int32 (h, w) map of painted class ids, -1 = unpainted.

    Layers are applied in order (later ones on top). A layer of another size (a client that
    resized it) is resampled to ``shape`` by nearest sampling. Painted colours farther than
    ``COLOUR_TOLERANCE`` from every brush colour are ignored.
    """
    strokes = np.full(shape, -1, np.int32)
    palette = np.asarray(colours, np.int32).reshape(-1, 3)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue  # without alpha, paint and background cannot be told apart
        if layer.shape[:2] != tuple(shape):
            layer = layer[nearest_indices(shape[0], layer.shape[0])[:, None],
                          nearest_indices(shape[1], layer.shape[1])[None, :]]
        ys, xs = np.nonzero(layer[:, :, 3] >= PAINTED_ALPHA)
        if ys.size == 0:
            continue
        rgb = layer[ys, xs, :3].astype(np.int32)
        dist = np.abs(rgb[:, None, :] - palette[None, :, :]).max(axis=2)
        nearest = dist.argmin(axis=1)
        ok = dist[np.arange(nearest.size), nearest] <= COLOUR_TOLERANCE
        strokes[ys[ok], xs[ok]] = nearest[ok]
    return strokes


def apply_strokes(
    labels: np.ndarray,
    strokes: np.ndarray,
    image: np.ndarray | None = None,
    refiner=None,
    *,
    on_progress: Callable[[int, int, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EditResult:
    """Apply a stroke map (preview size, -1 = unpainted) to full-resolution ``labels`` (H, W).

    ``refiner`` (an ``engine.refine.Refiner``) and ``image`` (H, W, 3) are used only when the
    strokes are smaller than the labels; see the module docstring.
    """
    H, W = labels.shape
    h, w = strokes.shape
    painted = strokes >= 0
    if not painted.any():
        return EditResult(labels.copy(), 0, None, False)
    out = labels.copy()
    if (h, w) == (H, W):
        new = strokes[painted].astype(labels.dtype)
        changed = int((out[painted] != new).sum())
        out[painted] = new
        ys, xs = np.nonzero(painted)
        return EditResult(out, changed, (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1), False)

    scale_y, scale_x = H / h, W / w
    ys, xs = np.nonzero(painted)
    y0 = max(0, math.floor(ys.min() * scale_y) - CONTEXT_PX)
    y1 = min(H, math.ceil((ys.max() + 1) * scale_y) + CONTEXT_PX)
    x0 = max(0, math.floor(xs.min() * scale_x) - CONTEXT_PX)
    x1 = min(W, math.ceil((xs.max() + 1) * scale_x) + CONTEXT_PX)
    rows = nearest_indices(H, h, y0, y1)
    cols = nearest_indices(W, w, x0, x1)
    full_strokes = strokes[rows[:, None], cols[None, :]]
    mask = full_strokes >= 0
    old = labels[y0:y1, x0:x1]
    edited = np.where(mask, full_strokes, old).astype(labels.dtype)

    snapped = False
    if refiner is not None and image is not None and len(np.unique(edited)) > 1:
        # The refiner's working size L = the region's own size (rounded up to a multiple of 8, at
        # most the default 900): its global step then runs at full resolution without enlarging a
        # small region to 900 px, so a stroke re-snaps in well under a second.
        L = int(min(900, max(64, -(-max(y1 - y0, x1 - x0) // 8) * 8)))
        refined = refiner.refine_labels(image[y0:y1, x0:x1], edited, L=L, on_progress=on_progress, cancel=cancel)
        r = max(1, math.ceil(max(scale_y, scale_x)))
        size = 2 * r + 1
        band = ndimage.maximum_filter(mask, size=size) & ~ndimage.minimum_filter(mask, size=size)
        # A class painted within reach of each band pixel (the larger id where two strokes meet;
        # -1 far from strokes): the refiner may move a stroke edge, but only choose between the
        # painted class and the old one, never bring in a third class.
        near = ndimage.maximum_filter(full_strokes, size=size)
        allowed = band & ((refined == old) | (refined == near))
        edited = np.where(allowed, refined, edited).astype(labels.dtype)
        snapped = True
    changed = int((edited != old).sum())
    out[y0:y1, x0:x1] = edited
    return EditResult(out, changed, (y0, y1, x0, x1), snapped)


__all__ = ["EditResult", "apply_strokes", "brush_colours", "css_colour", "strokes_from_layers"]
