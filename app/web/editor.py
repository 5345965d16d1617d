"""Corrections painted in the web editor, turned into class labels at full resolution.

The browser editor paints on a transparent layer over a preview of the image (the image with
its class colours blended in). Each class has its own brush colour; the eraser removes
paint. A painted pixel therefore says "this pixel is class k" and an unpainted one "no change".

Images larger than the editor can handle quickly are shown downscaled (``preview``). A stroke
on the preview covers blocks of full-resolution pixels, so its edges are only as precise as the
preview (and the hand). Mapping back (:func:`apply_strokes`): strokes are upsampled (nearest) to
full resolution inside their bounding box and, when the image is given, their outlines are
snapped onto the image's edges within a few preview pixels (:mod:`app.web.snap`: a watershed on
the gradient, no model), so stroke interiors keep the class the user painted, outlines follow
the image, and everything away from the strokes stays as it was.

Paint is semi-transparent (the image stays visible under it): the editor keeps each stroke's
colour as painted and its opacity in the layer's alpha, and a later stroke replaces an earlier
one where they overlap, so every painted pixel still holds exactly one class colour.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.errors import Cancelled

from .render import nearest_indices
from .snap import snap_reach, snap_strokes

#: Opacity of the brushes: the image shows through the paint.
BRUSH_OPACITY = 0.55
#: Layer alpha from which a pixel counts as painted (a stroke at ``BRUSH_OPACITY`` writes about 140).
PAINTED_ALPHA = 64
#: Largest per-channel difference between a painted colour and the nearest brush colour.
COLOUR_TOLERANCE = 40


@dataclass
class EditResult:
    """Labels after applying strokes. ``changed``: pixels whose class changed; ``box``: (y0, y1,
    x0, x1) of the region the edit touched at full resolution, or None; ``snapped``: whether stroke
    outlines were snapped to image edges; ``moved``: pixels the snap gave another class than the
    upsampled strokes did."""

    labels: np.ndarray
    changed: int
    box: tuple[int, int, int, int] | None
    snapped: bool
    moved: int = 0


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
    *,
    on_progress: Callable[[int, int, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EditResult:
    """Apply a stroke map (preview size, -1 = unpainted) to full-resolution ``labels`` (H, W).

    Strokes at the labels' size replace the painted pixels exactly. Preview strokes are
    upsampled and, with ``image`` (H, W[, 3]), their outlines snapped to the image's edges; see
    the module docstring.
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
    reach = snap_reach(max(scale_y, scale_x))
    margin = reach + 2  # unpainted ground beyond the snap's reach on every side
    ys, xs = np.nonzero(painted)
    y0 = max(0, math.floor(ys.min() * scale_y) - margin)
    y1 = min(H, math.ceil((ys.max() + 1) * scale_y) + margin)
    x0 = max(0, math.floor(xs.min() * scale_x) - margin)
    x1 = min(W, math.ceil((xs.max() + 1) * scale_x) + margin)
    rows = nearest_indices(H, h, y0, y1)
    cols = nearest_indices(W, w, x0, x1)
    full_strokes = strokes[rows[:, None], cols[None, :]]
    snapped, moved = False, 0
    if image is not None:
        if cancel is not None and cancel():
            raise Cancelled("correction cancelled")
        if on_progress is not None:
            on_progress(0, 1, "snapping the strokes to the image's edges")
        snapped_strokes = snap_strokes(full_strokes, image[y0:y1, x0:x1], reach)
        moved = int((snapped_strokes != full_strokes).sum())
        full_strokes, snapped = snapped_strokes, True
    old = labels[y0:y1, x0:x1]
    edited = np.where(full_strokes >= 0, full_strokes, old).astype(labels.dtype)
    changed = int((edited != old).sum())
    out[y0:y1, x0:x1] = edited
    if on_progress is not None:
        on_progress(1, 1, "correction applied")
    return EditResult(out, changed, (y0, y1, x0, x1), snapped, moved)


__all__ = ["BRUSH_OPACITY", "EditResult", "apply_strokes", "brush_colours", "css_colour", "strokes_from_layers"]
