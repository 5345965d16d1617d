"""Time and accuracy of applying a correction painted on the web editor's preview of a 4K image.

``python bench/edit_snap.py`` builds a 3840x2160 test image (a disc of one colour on another,
with noise), paints a disc-shaped stroke on the 1280x720 preview whose outline lies ``--offset``
full-resolution pixels inside or outside the true edge, applies it (``app.web.editor.apply_strokes``,
the path behind the page's Apply) and reports seconds and how far the result's outline lies from
the true edge, without and with the snap.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from app.web.editor import apply_strokes

H, W, PREVIEW = 2160, 3840, (720, 1280)


def test_image(radius: int, noise: float = 12.0, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): a reddish disc of ``radius`` at the centre on a blue ground, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:H, :W]
    disc = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= radius ** 2
    img = np.where(disc[..., None], np.float32([200, 80, 60]), np.float32([70, 110, 170]))
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def preview_disc(radius: float) -> np.ndarray:
    """Stroke map on the preview: class 1 inside a disc of ``radius`` full-resolution px, else -1."""
    h, w = PREVIEW
    sy, sx = H / h, W / w
    py, px = np.ogrid[:h, :w]
    inside = ((py + 0.5) * sy - H / 2) ** 2 + ((px + 0.5) * sx - W / 2) ** 2 <= radius ** 2
    return np.where(inside, 1, -1).astype(np.int32)


def outline_error(mask: np.ndarray, radius: int) -> tuple[float, float]:
    """(mean |distance|, median signed distance) of ``mask``'s outline from the true circle, px."""
    edge = mask ^ ndimage.binary_erosion(mask)
    ys, xs = np.nonzero(edge)
    d = np.hypot(ys + 0.5 - H / 2, xs + 0.5 - W / 2) - radius
    return float(np.abs(d).mean()), float(np.median(d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--radius", type=int, default=600)
    p.add_argument("--offset", type=int, nargs="+", default=[-10, -5, 5, 10],
                   help="outline of the stroke relative to the true edge, full-resolution px")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    image = test_image(args.radius)
    labels = np.zeros((H, W), np.uint8)
    print(f"image {W}x{H}, preview {PREVIEW[1]}x{PREVIEW[0]}, disc radius {args.radius}")
    for offset in args.offset:
        strokes = preview_disc(args.radius + offset)
        plain = apply_strokes(labels, strokes)  # no image: upsampled strokes only
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            snapped = apply_strokes(labels, strokes, image)
            times.append(time.perf_counter() - t)
        before, after = outline_error(plain.labels == 1, args.radius), outline_error(snapped.labels == 1, args.radius)
        print(f"stroke {offset:+d} px off: apply {min(times):.2f} s (best of {args.repeat}); outline off the edge "
              f"{before[0]:.1f} px (median {before[1]:+.1f}) without the snap, {after[0]:.1f} px "
              f"(median {after[1]:+.1f}) with it; {snapped.moved} px moved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
