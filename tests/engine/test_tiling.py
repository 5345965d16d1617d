"""Tile grid, blending, bounded-memory resampling and free memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import tiling
from engine.tiling import (
    TileAccumulator,
    area_resize,
    bilinear_region,
    max_overlap,
    source_span,
    tile_grid,
)


def test_grid_starts_match_the_reference_rule():
    # L=64, margin 8 -> step 64//2 - 16 = 16; starts past W-L are shifted to W-L and deduplicated.
    tiles = tile_grid(100, 150, 64, margin=8)
    xs = sorted({t.x0 for t in tiles})
    ys = sorted({t.y0 for t in tiles})
    assert xs == [0, 16, 32, 48, 64, 80, 86]
    assert ys == [0, 16, 32, 36]
    assert len(tiles) == len(xs) * len(ys)
    assert all((t.y1 - t.y0, t.x1 - t.x0) == (64, 64) for t in tiles)
    # x-major order, as the reference loops
    assert [(t.x0, t.y0) for t in tiles[:5]] == [(0, 0), (0, 16), (0, 32), (0, 36), (16, 0)]


def test_written_regions_trim_inner_edges_and_cover_everything():
    H, W = 130, 170
    tiles = tile_grid(H, W, 64, margin=8)
    cover = np.zeros((H, W), int)
    for t in tiles:
        assert t.wy0 - t.y0 == (8 if t.y0 > 0 else 0)
        assert t.y1 - t.wy1 == (8 if t.y1 < H else 0)
        assert t.wx0 - t.x0 == (8 if t.x0 > 0 else 0)
        assert t.x1 - t.wx1 == (8 if t.x1 < W else 0)
        cover[t.written] += 1
    assert cover.min() >= 1
    assert cover.max() <= max_overlap(tiles)


def test_grid_for_an_image_smaller_than_a_tile_is_one_untrimmed_tile():
    (t,) = tile_grid(50, 70, 900)
    assert (t.y0, t.y1, t.x0, t.x1) == (0, 50, 0, 70)
    assert (t.wy0, t.wy1, t.wx0, t.wx1) == (0, 50, 0, 70)
    with pytest.raises(ValueError):
        tile_grid(100, 100, 40, margin=16)


def test_accumulator_averages_overlaps_and_falls_back_elsewhere():
    tiles = tile_grid(40, 60, 32, margin=4)  # step 8
    acc = TileAccumulator(40, 60, max_overlap(tiles))
    chosen = tiles[::3]
    for t in chosen:
        acc.add(t, np.full((32, 32), float(t.index), np.float32))
    expect_sum = np.zeros((40, 60))
    expect_n = np.zeros((40, 60))
    for t in chosen:
        expect_sum[t.written] += t.index
        expect_n[t.written] += 1
    out = acc.finish(fallback=lambda r0, r1: np.full((r1 - r0, 60), -1.0, np.float32), strip_rows=7)
    expect = np.where(expect_n > 0, expect_sum / np.maximum(expect_n, 1), -1.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    assert (expect_n == 0).any() and (expect_n > 1).any()


@pytest.mark.parametrize("shape,out", [((97, 131), (40, 57)), ((64, 48), (64, 48)), ((300, 7), (11, 3))])
def test_area_resize_equals_torch_area_interpolation(shape, out):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    got = area_resize(img, *out, convert=lambda a: a / 255.0)
    ref = F.interpolate(torch.from_numpy(img / 255.0).permute(2, 0, 1)[None], size=out, mode="area")
    np.testing.assert_allclose(got, ref[0].permute(1, 2, 0).numpy(), atol=1e-6)
    mask = rng.random(shape) > 0.5
    got = area_resize(mask, *out)
    ref = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=out, mode="area")
    np.testing.assert_allclose(got, ref[0, 0].numpy(), atol=1e-6)


def test_area_resize_works_in_strips(monkeypatch):
    monkeypatch.setattr(tiling, "STRIP_ELEMENTS", 300)  # force many strips
    img = np.random.default_rng(1).random((211, 50))
    got = area_resize(img, 37, 20)
    ref = F.interpolate(torch.from_numpy(img)[None, None], size=(37, 20), mode="area")[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("low_shape,out", [((23, 41), (100, 177)), ((90, 60), (50, 31))])
def test_bilinear_region_equals_a_crop_of_the_full_resize(low_shape, out):
    low = torch.rand(low_shape)
    full = F.interpolate(low[None, None], size=out, mode="bilinear", align_corners=False)[0, 0]
    for rows, cols in [((0, out[0]), (0, out[1])), ((3, 40), (17, 30)), ((out[0] - 5, out[0]), (0, 9))]:
        got = bilinear_region(low, out, rows, cols)
        torch.testing.assert_close(got, full[rows[0]:rows[1], cols[0]:cols[1]], atol=1e-5, rtol=0)


def test_source_span_holds_every_source_index():
    low = torch.zeros(23, 41)
    a, b = source_span(23, 100, 40, 61)
    low[a:b] = 1.0  # only rows inside the span are non-zero
    got = bilinear_region(low, (100, 177), (40, 61), (0, 177))
    assert torch.all(got == 1.0)
    assert b - a < 23


def test_available_memory_is_plausible():
    assert 16 << 20 < tiling.available_memory("cpu") < 1 << 50
