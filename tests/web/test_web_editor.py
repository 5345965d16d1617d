"""Editor strokes -> labels at full resolution, and the images the page shows (no browser, no server)."""
from __future__ import annotations

import numpy as np
import pytest

from app.web.editor import (
    COLOUR_TOLERANCE,
    apply_strokes,
    brush_colours,
    strokes_from_layers,
)
from app.web.render import (
    downscale_labels,
    fit_size,
    legend_html,
    metrics_markdown,
    overlay_view,
    to_uint8,
)

COLOURS = [(0, 0, 0), (200, 40, 40), (40, 40, 200)]


def layer(shape, paint: list[tuple[tuple[slice, slice], tuple[int, int, int]]], alpha: int = 255) -> np.ndarray:
    out = np.zeros(shape + (4,), np.uint8)
    for region, colour in paint:
        out[region] = (*colour, alpha)
    return out


class FakeRefiner:
    """Returns a fixed answer for the region it is given, and records the call."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def refine_labels(self, image, labels, **kwargs):
        self.calls.append((image.shape, labels.copy(), kwargs))
        return self.answer(labels)


def test_strokes_map_colours_to_classes_and_ignore_the_rest():
    shape = (20, 30)
    painted = layer(shape, [((slice(2, 5), slice(2, 6)), COLOURS[1]), ((slice(10, 12), slice(0, 30)), COLOURS[0])])
    painted[15, 15] = (120, 250, 120, 255)  # a colour no class has
    painted[16, 16] = (*COLOURS[2], 40)  # nearly transparent: not paint
    near = tuple(min(255, c + COLOUR_TOLERANCE - 1) for c in COLOURS[2])
    painted[17, 17] = (*near, 255)  # within tolerance of class 2
    strokes = strokes_from_layers([painted], COLOURS, shape)
    assert (strokes[2:5, 2:6] == 1).all()
    assert (strokes[10:12] == 0).all()
    assert strokes[15, 15] == -1 and strokes[16, 16] == -1 and strokes[17, 17] == 2
    assert (strokes >= 0).sum() == 12 + 60 + 1


def test_later_layers_win_and_other_sizes_are_resampled():
    first = layer((10, 10), [((slice(0, 10), slice(0, 10)), COLOURS[1])])
    second = layer((20, 20), [((slice(0, 10), slice(0, 20)), COLOURS[2])])  # twice the size: top half
    strokes = strokes_from_layers([first, second], COLOURS, (10, 10))
    assert (strokes[:5] == 2).all() and (strokes[5:] == 1).all()
    assert (strokes_from_layers([np.zeros((10, 10, 3), np.uint8)], COLOURS, (10, 10)) == -1).all()


def test_full_size_strokes_change_exactly_the_painted_pixels():
    labels = np.zeros((12, 16), np.uint8)
    strokes = np.full((12, 16), -1, np.int32)
    strokes[3:6, 4:9] = 2
    strokes[0, 0] = 0  # painted with the class it already has
    refiner = FakeRefiner(lambda lab: lab)
    result = apply_strokes(labels, strokes, np.zeros((12, 16, 3), np.uint8), refiner)
    expected = labels.copy()
    expected[3:6, 4:9] = 2
    np.testing.assert_array_equal(result.labels, expected)
    assert result.changed == 15 and not result.snapped and not refiner.calls
    assert labels.max() == 0  # the input is not modified


def test_no_strokes_change_nothing():
    labels = np.arange(20, dtype=np.uint8).reshape(4, 5) % 3
    result = apply_strokes(labels, np.full((2, 3), -1, np.int32))
    np.testing.assert_array_equal(result.labels, labels)
    assert result.changed == 0 and result.box is None


def test_preview_strokes_are_upsampled_to_full_resolution():
    H, W, s = 200, 300, 4  # the editor showed a 50x75 preview
    labels = np.zeros((H, W), np.uint8)
    strokes = np.full((H // s, W // s), -1, np.int32)
    strokes[10:20, 30:40] = 1
    result = apply_strokes(labels, strokes)  # no refiner: nearest upsampling only
    expected = np.zeros((H, W), np.uint8)
    expected[40:80, 120:160] = 1
    np.testing.assert_array_equal(result.labels, expected)
    assert result.changed == 40 * 40
    y0, y1, x0, x1 = result.box
    assert y0 <= 40 and y1 >= 80 and x0 <= 120 and x1 >= 160


def test_refiner_resnaps_only_a_band_around_preview_strokes():
    H, W, s = 200, 300, 4
    labels = np.zeros((H, W), np.uint8)
    labels[:, 200:] = 2
    strokes = np.full((H // s, W // s), -1, np.int32)
    strokes[10:20, 30:40] = 1

    # A refiner that shrinks the stroke by 2 px, opens a hole in its middle and puts a third class
    # just outside it.
    def answer(lab):
        out = np.zeros(lab.shape, lab.dtype)
        ys, xs = np.nonzero(lab == 1)
        out[ys.min() + 2: ys.max() - 1, xs.min() + 2: xs.max() - 1] = 1
        out[ys.min() + 20, xs.min() + 20] = 0
        out[ys.min() - 2, xs.min(): xs.max() + 1] = 2
        return out

    refiner = FakeRefiner(answer)
    image = np.zeros((H, W, 3), np.uint8)
    result = apply_strokes(labels, strokes, image, refiner)
    assert result.snapped and len(refiner.calls) == 1
    crop_shape, given, kwargs = refiner.calls[0]
    assert crop_shape[:2] == given.shape and given.shape[0] < H and given.shape[1] < W  # only the region
    assert kwargs["L"] <= 900 and kwargs["L"] % 8 == 0
    out = result.labels
    # in the band (within s px of the stroke's edge) the refiner moved the edge ...
    assert (out[40:42, 120:160] == 0).all() and (out[42:78, 122:158] == 1).all()
    # ... but the stroke's interior kept the painted class, and the third class never came in
    assert out[60, 140] == 1
    assert (out[:, :200] != 2).all()
    np.testing.assert_array_equal(out[:, 200:], 2)
    # away from the stroke nothing changed
    assert (out[:30, :200] == 0).all() and (out[90:, :200] == 0).all()


def test_brush_colours_are_distinct_even_for_a_palette_with_repeats():
    colours = brush_colours([[10, 10, 10], [10, 10, 10], [250, 250, 250]], 4)
    assert len(set(colours)) == 4
    assert colours[0] == (10, 10, 10) and colours[2] == (250, 250, 250)


def test_views_fit_the_display_and_keep_classes_unblended():
    assert fit_size(4000, 6000, 2048) == (1365, 2048)
    assert fit_size(100, 50, 2048) == (100, 50)
    labels = np.zeros((400, 600), np.uint8)
    labels[:, 300:] = 1
    small = downscale_labels(labels, (100, 150))
    assert set(np.unique(small)) == {0, 1} and (small[:, :75] == 0).all() and (small[:, 75:] == 1).all()
    view = overlay_view(np.full((400, 600, 3), 255, np.uint8), labels, [[0, 0, 0], [255, 0, 0]], 150)
    assert view.shape == (100, 150, 3)
    np.testing.assert_array_equal(view[0, 0], [128, 128, 128])
    np.testing.assert_array_equal(view[0, -1], [255, 128, 128])


def test_narrow_16_bit_images_are_stretched_for_display():
    dark = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    shown = to_uint8(np.dstack([dark] * 3))
    assert shown.min() <= 5 and shown.max() >= 250
    full = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    np.testing.assert_allclose(to_uint8(np.dstack([full] * 3))[..., 0].astype(float), full / 257.0, atol=1)


def test_legend_lists_present_classes_first_with_shares():
    labels = np.array([[2, 2, 2, 0]], np.uint8)
    html = legend_html(["sky", "road", "tree <b>"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]], labels)
    assert html.index("tree &lt;b&gt; 75.0%") < html.index("sky 25.0%") < html.index("road 0.0%")
    assert "rgb(7,8,9)" in html


@pytest.mark.parametrize("pairs", [0, 3])
def test_metrics_table(pairs):
    before = {"miou": 40.0, "mba": 50.0, "pairs": pairs, "per_class_iou": {"sky": 80.0}}
    after = {"miou": 45.5, "mba": 52.0, "pairs": pairs, "per_class_iou": {"sky": 85.0}}
    text = metrics_markdown(before, after, "camvid-ft1")
    if pairs:
        assert "| mIoU (%) | 40.0 | 45.5 |" in text and "| IoU sky | 80.0 | 85.0 |" in text
    else:
        assert "No validation pairs" in text
    assert "cancelled" in metrics_markdown(before, {}, None)
