"""engine.io.unit_rgb: the one normaliser of image pixels (float32 RGB in [0, 1])."""
from __future__ import annotations

import numpy as np
import pytest

from engine.io import image_from_array, unit_rgb


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32])
def test_integers_are_divided_by_their_largest_value_in_float32(dtype):
    top = np.iinfo(dtype).max
    arr = np.array([[[0, 1, top], [top // 2, 3, 7]]], dtype)
    out = unit_rgb(arr)
    assert out.dtype == np.float32 and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out, arr.astype(np.float32) / np.float32(top))
    assert out[0, 0, 2] == 1.0 and out[0, 0, 0] == 0.0


def test_gray_is_repeated_and_alpha_dropped():
    gray = np.array([[0, 255], [51, 102]], np.uint8)
    out = unit_rgb(gray)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(out[..., 1], np.float32(gray) / np.float32(255))
    gray_alpha = np.stack([gray, np.full_like(gray, 9)], axis=-1)
    np.testing.assert_array_equal(unit_rgb(gray_alpha), out)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 9)])
    np.testing.assert_array_equal(unit_rgb(rgba), out)


def test_float_rgb_comes_back_as_a_view_unless_a_copy_is_asked_for():
    image = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    assert unit_rgb(image) is image
    copy = unit_rgb(image, copy=True)
    assert not np.shares_memory(copy, image)
    np.testing.assert_array_equal(copy, image)
    as64 = unit_rgb(image.astype(np.float64))
    assert as64.dtype == np.float32
    np.testing.assert_array_equal(as64, image)
    np.testing.assert_array_equal(unit_rgb(np.array([[True, False]])), [[[1, 1, 1], [0, 0, 0]]])


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1), (6, 7, 2), (6, 7, 3), (6, 7, 4), (3, 6, 7)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_image_from_array_checks_then_normalises_the_same_way(shape, dtype):
    rng = np.random.default_rng(1)
    arr = rng.random(shape).astype(dtype) if dtype == np.float32 else rng.integers(0, 200, shape).astype(dtype)
    out = image_from_array(arr)
    channels_last = np.moveaxis(arr, 0, -1) if shape[0] == 3 else arr
    np.testing.assert_array_equal(out, unit_rgb(channels_last))
    assert out.dtype == np.float32 and out.shape == (6, 7, 3) and not np.shares_memory(out, arr)
