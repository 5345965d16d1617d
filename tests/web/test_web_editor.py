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
    image = np.zeros((12, 16, 3), np.uint8)
    image[:, 6:] = 255  # an edge the full-size strokes cross: they are not snapped to it
    result = apply_strokes(labels, strokes, image)
    expected = labels.copy()
    expected[3:6, 4:9] = 2
    np.testing.assert_array_equal(result.labels, expected)
    assert result.changed == 15 and not result.snapped
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
    result = apply_strokes(labels, strokes)  # no image: nearest upsampling only
    expected = np.zeros((H, W), np.uint8)
    expected[40:80, 120:160] = 1
    np.testing.assert_array_equal(result.labels, expected)
    assert result.changed == 40 * 40
    y0, y1, x0, x1 = result.box
    assert y0 <= 40 and y1 >= 80 and x0 <= 120 and x1 >= 160


def edge_image(H: int, W: int, edge_x: int, seed: int = 0) -> np.ndarray:
    """Grey noise with a vertical step edge at column ``edge_x`` (darker left, lighter right)."""
    rng = np.random.default_rng(seed)
    img = np.where(np.arange(W)[None, :, None] < edge_x, 90.0, 170.0) + rng.normal(0, 8, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("off", [-10, -5, 5, 10])
def test_preview_strokes_snap_onto_an_edge_5_to_10_px_away(off):
    H, W, s = 240, 400, 4  # a 60x100 preview
    edge = 200
    labels = np.zeros((H, W), np.uint8)
    labels[:, 300:] = 2
    image = edge_image(H, W, edge)
    strokes = np.full((H // s, W // s), -1, np.int32)
    strokes[10:50, 20:(edge + off) // s] = 1  # the stroke's right outline lies `off` px from the edge
    plain = apply_strokes(labels, strokes)
    result = apply_strokes(labels, strokes, image)
    rows = slice(40 + 14, 200 - 14)  # away from the stroke's corners
    drawn = (plain.labels[rows] == 1).sum(axis=1).max() + 80
    snapped_right = np.array([np.flatnonzero(r == 1).max() + 1 for r in result.labels[rows]])
    assert abs(drawn - edge) >= 4  # the upsampled stroke really was off the edge ...
    assert np.abs(snapped_right - edge).max() <= 1  # ... and its outline now lies on it
    assert result.snapped and result.moved > 0
    # the interior keeps the painted class; nothing beyond the snap's reach changed; no class came in
    assert (result.labels[60:180, 100:180] == 1).all()
    assert (result.labels[:, 230:300] == 0).all() and (result.labels[:, 300:] == 2).all()
    assert (result.labels[:20, :300] == 0).all() and (result.labels[220:, :300] == 0).all()


def test_preview_strokes_keep_their_outline_where_the_image_has_no_edge():
    H, W, s = 240, 400, 4
    labels = np.zeros((H, W), np.uint8)
    flat = edge_image(H, W, W + 1)  # noise only
    strokes = np.full((H // s, W // s), -1, np.int32)
    strokes[10:50, 20:60] = 1
    thin = strokes.copy()
    thin[55, 10:90] = 2  # one preview pixel wide: 4 px at full size, narrower than the snap's reach
    plain = apply_strokes(labels, thin)
    result = apply_strokes(labels, thin, flat)
    disagree = (plain.labels != result.labels).sum()
    outline = 2 * (160 + 160) + 2 * 320  # pixels along the outlines
    assert disagree <= outline  # on average less than a pixel off the drawn outline
    assert (result.labels == 2).sum() >= 0.8 * (plain.labels == 2).sum()  # the thin stroke survives


def test_a_stroke_on_a_4k_preview_applies_quickly():
    import time

    H, W = 2160, 3840
    image = edge_image(H, W, 1900)
    labels = np.zeros((H, W), np.uint8)
    strokes = np.full((720, 1280), -1, np.int32)
    strokes[200:500, 300:630] = 1  # 990x900 px at full size, its right outline 10 px off the edge
    started = time.perf_counter()
    result = apply_strokes(labels, strokes, image)
    seconds = time.perf_counter() - started
    assert result.snapped and (result.labels[1000, 1880:1900] == 1).all()
    assert seconds < 6, f"{seconds:.1f} s (bench/edit_snap.py: about 0.6 s on two cores)"


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
    html = legend_html(["sky", "road", "tree <b>"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]], labels,
                       swatches=[(1, 2, 3), (4, 5, 6), (7, 8, 10)])
    assert html.index("tree &lt;b&gt; 75.0%") < html.index("sky 25.0%") < html.index("road 0.0%")
    assert "rgb(7,8,9)" in html
    # each entry names the brush colour of its class, so the page can name the editor's swatches
    assert 'data-name="tree &lt;b&gt;" data-brush="rgb(7, 8, 10)"' in html


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
