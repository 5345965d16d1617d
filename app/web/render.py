"""What the web page shows, computed without any UI library: downscaled views, colour maps, legend.

Every function takes and returns numpy arrays or strings, so it is tested without a browser.
Display images are uint8 RGB ``(h, w, 3)`` no larger than a given longest side; labels and
images at full resolution stay on the server.
"""
from __future__ import annotations

import html

import numpy as np
from PIL import Image

from app.overlay import colorize

#: Colour stops (position in [0, 1], RGB) of the uncertainty map: dark blue (sure) to yellow (unsure).
UNCERTAINTY_STOPS = (
    (0.0, (13, 8, 135)),
    (0.35, (126, 3, 168)),
    (0.65, (225, 100, 98)),
    (1.0, (240, 249, 33)),
)


def fit_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the longer side at most ``max_side`` (never enlarged), aspect ratio kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image of any supported dtype as uint8 for display.

    uint8 passes through. uint16 and float images are stretched between their 0.5th and 99.5th
    percentiles (estimated on a subsample) when they use less than a quarter of their range:
    16-bit microscopy often fills only a few thousand grey levels and would look black.
    """
    if image.dtype == np.uint8:
        return image
    full = 65535.0 if image.dtype == np.uint16 else 1.0
    sample = image[:: max(1, image.shape[0] // 512), :: max(1, image.shape[1] // 512)].astype(np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi - lo <= 0 or hi - lo >= full / 4:
        lo, hi = 0.0, full
    out = np.empty(image.shape, np.uint8)
    for r0 in range(0, image.shape[0], 512):  # row strips keep the float copy small
        strip = (image[r0:r0 + 512].astype(np.float32) - lo) * (255.0 / (hi - lo))
        out[r0:r0 + 512] = np.clip(strip + 0.5, 0, 255).astype(np.uint8)
    return out


def downscale_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) image (any dtype) -> uint8 (h, w, 3) by area averaging (box filter)."""
    small = to_uint8(image)
    if small.shape[:2] == tuple(size):
        return np.ascontiguousarray(small)
    pil = Image.fromarray(np.ascontiguousarray(small))
    return np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BOX))


def nearest_indices(n_out: int, n_in: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Source index of each output pixel ``start..stop`` for a nearest resize ``n_in -> n_out``.

    Pixel centres are aligned (half-pixel convention), so down- and upscaling are consistent.
    """
    stop = n_out if stop is None else stop
    idx = ((np.arange(start, stop, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def downscale_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) labels -> (h, w) by nearest sampling (class ids are never blended)."""
    H, W = labels.shape
    if (H, W) == tuple(size):
        return labels
    return labels[nearest_indices(size[0], H)[:, None], nearest_indices(size[1], W)[None, :]]


def overlay_view(image: np.ndarray, labels: np.ndarray | None, palette: list[list[int]], max_side: int,
                 alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over the image, uint8 (h, w, 3) with the longer side <= ``max_side``."""
    size = fit_size(image.shape[0], image.shape[1], max_side)
    small = downscale_image(image, size)
    if labels is None:
        return small
    colours = colorize(downscale_labels(labels, size), palette).astype(np.float32)
    return (small.astype(np.float32) * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def uncertainty_view(uncertainty: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W) uncertainty in [0, 1] (1 - top class probability) -> colour map, uint8 (h, w, 3).

    The top-class probability of C classes is at least 1/C, so uncertainty never exceeds
    1 - 1/C; the map is not rescaled, so the colours mean the same on every image.
    """
    size = fit_size(uncertainty.shape[0], uncertainty.shape[1], max_side)
    small = downscale_labels(uncertainty, size).astype(np.float32)
    return colormap(small)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB by linear interpolation between ``UNCERTAINTY_STOPS``."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
    xs = np.array([s[0] for s in UNCERTAINTY_STOPS], np.float32)
    out = np.empty(v.shape + (3,), np.uint8)
    for c in range(3):
        ys = np.array([s[1][c] for s in UNCERTAINTY_STOPS], np.float32)
        out[..., c] = (np.interp(v, xs, ys) + 0.5).astype(np.uint8)
    return out


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of pixels per class id 0..max(num_classes, max label) as float64."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes).astype(np.float64)
    return counts / max(1.0, counts.sum())


def class_order(labels: np.ndarray | None, num_classes: int) -> list[int]:
    """Class ids in the legend's order: with ``labels``, present classes first, largest first
    (ties by id), then the absent ones; without, by id."""
    order = list(range(num_classes))
    if labels is not None:
        shares = class_shares(labels, num_classes)
        order.sort(key=lambda i: -shares[i])
    return order


def legend_html(classes: list[str], palette: list[list[int]], labels: np.ndarray | None = None,
                swatches: list[tuple[int, int, int]] | None = None) -> str:
    """An HTML legend: a colour swatch and name per class, with its share of the image when known.

    With ``labels`` the classes present come first, largest first; absent classes follow greyed.
    ``swatches``: the brush colour of each class id, written as ``data-brush`` so the page can
    name the editor's colour swatches after the classes.
    """
    shares = class_shares(labels, len(classes)) if labels is not None else None
    items = []
    for i in class_order(labels, len(classes)):
        r, g, b = (palette[i] if i < len(palette) else (0, 0, 0))[:3]
        share = "" if shares is None else f" {100 * shares[i]:.1f}%"
        faded = shares is not None and shares[i] == 0
        style = "opacity:0.45;" if faded else ""
        brush = ""
        if swatches is not None and i < len(swatches):
            brush = ' data-brush="rgb({}, {}, {})"'.format(*swatches[i][:3])
        items.append(
            f'<span class="fm-class" data-class="{i}" data-name="{html.escape(str(classes[i]))}"{brush} '
            f'style="display:inline-flex;align-items:center;margin:2px 10px 2px 0;{style}">'
            f'<span style="display:inline-block;width:14px;height:14px;border:1px solid #555;'
            f'background:rgb({r},{g},{b});margin-right:4px"></span>'
            f"{html.escape(str(classes[i]))}{share}</span>"
        )
    return '<div class="fm-legend">' + "".join(items) + "</div>"


def metrics_markdown(before: dict | None, after: dict | None, name: str | None) -> str:
    """A Markdown table of validation scores before and after fine-tuning; a score that is
    missing or not a number (a card written when no validation pixel was labelled) shows "n/a".
    Scores on the strip held back from each training pair (a store without validation pairs) say
    so, and a version that scores below its parent is flagged."""
    from app.workbench.metrics import BELOW_PARENT, scored_lower

    before = before if isinstance(before, dict) else {}
    after = after if isinstance(after, dict) else {}
    if not before and not after:
        return ""
    pairs = _count((after or before).get("pairs"))
    lines = [f"**{name}**" if name else "**cancelled** (the run's state is kept; start again to resume)", ""]
    if not pairs:
        lines.append("No validation pairs in the store yet, so no before/after scores.")
        return "\n".join(lines)
    held = (after or before).get("validation")
    if held:
        lines += [f"No validation pairs in the store: scored on the {html.escape(str(held))} of each of {pairs} "
                  "training pairs (never trained on).", ""]
    else:
        lines += [f"Validation pairs: {pairs}", ""]
    if after and scored_lower(before, after):
        lines += [f"**{BELOW_PARENT}**: this version scores lower than the model it was fine-tuned from.", ""]
    lines += ["| metric | before | after |", "|---|---|---|"]
    for key, label in (("miou", "mIoU (%)"), ("mba", "mBA (%)"), ("pixel_accuracy", "pixel accuracy (%)")):
        b, a = before.get(key), after.get(key)
        if key == "pixel_accuracy" and b is None and a is None:
            continue  # cards written before pixel accuracy was recorded
        lines.append(f"| {label} | {_num(b)} | {_num(a)} |")
    per_before, per_after = before.get("per_class_iou") or {}, after.get("per_class_iou") or {}
    per_before, per_after = (p if isinstance(p, dict) else {} for p in (per_before, per_after))
    for cls in dict.fromkeys([*per_before, *per_after]):
        lines.append(f"| IoU {html.escape(str(cls))} | {_num(per_before.get(cls))} | {_num(per_after.get(cls))} |")
    return "\n".join(lines)


def _num(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{float(value):.1f}"


def _count(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else 0


__all__ = [
    "class_order", "class_shares", "colormap", "downscale_image", "downscale_labels", "fit_size", "legend_html",
    "metrics_markdown", "nearest_indices", "overlay_view", "to_uint8", "uncertainty_view",
]
