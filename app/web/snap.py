"""Stroke edges moved onto image edges: the "snap" of a correction painted on a preview.

A stroke painted on a downscaled preview lands, at full resolution, a few pixels off the edge
the person meant (the preview's blocky pixels, and a hand's precision). :func:`snap_strokes`
re-decides only the pixels within ``reach`` of a stroke's outline, along the outline's normals:

- the outline is the zero level of the stroke's signed distance map, smoothed so that the
  preview's staircase does not matter; its gradient gives the normal at every pixel nearby;
- along the normal through each pixel, from ``reach`` px inside the outline to ``reach`` px
  outside, the strongest image edge is found (gradient magnitude, slightly favouring edges near
  the drawn outline); where it is at least :data:`MIN_EDGE` strong, the outline moves onto the
  centre of that edge (the stroke grows or shrinks there), elsewhere (flat or noisy ground) the
  stroke keeps its shape as drawn;
- a thin stroke keeps its centre line, so it never vanishes, and a stroke never takes pixels
  painted with another class.

No model runs: a stroke across a 4K image snaps in well under a second (``bench/edit_snap.py``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: Smallest reach (full-resolution pixels) of the snap around a stroke's outline.
SNAP_MIN_PX = 12
#: Reach in preview pixels: a stroke may be this many preview pixels off the edge it follows.
SNAP_PREVIEW_PX = 3
#: Gradient (change of intensity in 0..1 per pixel, after a Gaussian of sigma 1) that counts as a
#: full-strength edge; an edge of contrast 0.2 reaches it.
EDGE_SCALE = 0.08
#: Weakest edge (in units of a full-strength edge) an outline is moved onto.
MIN_EDGE = 0.5
#: Band pixels handled at once (bounds the memory of the profiles across the outline).
CHUNK = 1 << 16
#: Preference for edges near the drawn outline: a candidate edge loses this much strength per
#: ``reach`` of distance from the outline.
NEAR_BONUS = 0.2


def snap_reach(scale: float) -> int:
    """Reach of the snap (full-resolution px) for a preview downscaled by ``scale``."""
    return max(SNAP_MIN_PX, math.ceil(SNAP_PREVIEW_PX * scale))


def edge_strength(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude of an (h, w[, c]) image (any dtype) in units of :data:`EDGE_SCALE`, at most 1
    (float32 (h, w)); colour images take the strongest channel."""
    arr = np.asarray(image)
    full = 255.0 if arr.dtype == np.uint8 else 65535.0 if arr.dtype == np.uint16 else 1.0
    planes = arr[..., None] if arr.ndim == 2 else arr[..., :3]
    out = np.zeros(planes.shape[:2], np.float32)
    for c in range(planes.shape[2]):
        plane = ndimage.gaussian_filter(planes[..., c].astype(np.float32) / full, 1.0)
        gy, gx = ndimage.sobel(plane, 0), ndimage.sobel(plane, 1)
        np.maximum(out, np.hypot(gy, gx) / 8.0, out=out)  # the Sobel kernel sums to 8x the slope
    return np.minimum(out / EDGE_SCALE, 1.0, out=out)


def snap_strokes(strokes: np.ndarray, image: np.ndarray, reach: int) -> np.ndarray:
    """``strokes`` (h, w) int, class ids and -1 for unpainted, at the image's resolution ->
    the same map with each stroke's outline moved onto the strongest image edge within ``reach``
    px of it, where there is one (see the module docstring)."""
    strokes = np.asarray(strokes)
    out = strokes.copy()
    strength = None
    for k in np.unique(strokes[strokes >= 0]):
        mask = strokes == k
        # signed distance of each pixel centre from the outline: negative inside the stroke
        phi = np.where(mask, 0.5 - ndimage.distance_transform_edt(mask),
                       ndimage.distance_transform_edt(~mask) - 0.5).astype(np.float32)
        band = np.abs(phi) <= reach
        if not band.any():
            continue
        if strength is None:
            strength = edge_strength(image)
        smooth = ndimage.gaussian_filter(phi, max(1.0, reach / 4.0))
        ys, xs = np.nonzero(band)
        painted = np.empty(ys.size, bool)
        for c0 in range(0, ys.size, CHUNK):
            sl = slice(c0, c0 + CHUNK)
            painted[sl] = _inside_edge(strength, smooth, ys[sl], xs[sl], mask[ys[sl], xs[sl]], reach)
        free = (strokes[ys, xs] == k) | (strokes[ys, xs] < 0)  # never take another class's stroke
        grow, shrink = painted & free, ~painted & (strokes[ys, xs] == k)
        out[ys[grow], xs[grow]] = k
        out[ys[shrink], xs[shrink]] = -1
        spine = _thin_spines(mask, phi, reach)
        out[spine] = k
    return out


def _inside_edge(strength: np.ndarray, phi: np.ndarray, ys: np.ndarray, xs: np.ndarray, drawn: np.ndarray,
                 reach: int) -> np.ndarray:
    """Whether each pixel (ys, xs) lies inside the stroke once its outline is on the edge found
    along its normal (``drawn``: inside as painted, where no edge is strong enough)."""
    gy, gx = np.gradient(phi)
    d = phi[ys, xs]
    ny, nx = gy[ys, xs], gx[ys, xs]
    length = np.maximum(np.hypot(ny, nx), 1e-6)
    ny, nx = ny / length, nx / length
    t = np.arange(-reach, reach + 1, dtype=np.float32)
    # points across the outline: the outline point nearest the pixel, plus t along the normal
    sy = ys[:, None] + (t[None, :] - d[:, None]) * ny[:, None]
    sx = xs[:, None] + (t[None, :] - d[:, None]) * nx[:, None]
    profile = ndimage.map_coordinates(strength, [sy.ravel(), sx.ravel()], order=1, mode="nearest")
    profile = profile.reshape(sy.shape).astype(np.float32)
    best = np.argmax(profile - NEAR_BONUS * np.abs(t)[None, :] / float(reach), axis=1)
    peak = profile[np.arange(best.size), best]
    # the centre of the gradient peak (a step between two pixels gives both the same strength)
    near = (np.abs(t[None, :] - t[best][:, None]) <= 2) & (profile >= 0.5 * peak[:, None])
    weight = np.where(near, profile, 0.0)
    edge_at = (weight * t[None, :]).sum(axis=1) / np.maximum(weight.sum(axis=1), 1e-6)
    return np.where(peak >= MIN_EDGE, d < edge_at, drawn)


def _thin_spines(mask: np.ndarray, phi: np.ndarray, reach: int) -> np.ndarray:
    """The centre lines of the pieces of ``mask`` no wider than twice ``reach`` (bool map)."""
    from skimage.morphology import skeletonize

    spine = np.zeros(mask.shape, bool)
    pieces, count = ndimage.label(mask)
    if count == 0:
        return spine
    deepest = ndimage.minimum(phi, pieces, index=np.arange(1, count + 1))
    for index, (rows, cols) in enumerate(ndimage.find_objects(pieces), start=1):
        if deepest[index - 1] < -reach:
            continue  # a core beyond the snap's reach keeps the piece
        piece = pieces[rows, cols] == index
        spine[rows, cols] |= skeletonize(piece)
    return spine

__all__ = ["EDGE_SCALE", "MIN_EDGE", "SNAP_MIN_PX", "edge_strength", "snap_reach", "snap_strokes"]
