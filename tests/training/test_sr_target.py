"""SRNet residual target: Pillow's kernels applied with torch, and the SR image from a residual."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from training.sr_target import (
    DETAIL,
    EDGE_ENHANCE_MORE,
    bicubic_up,
    enhance_residual,
    pillow_kernel_filter,
    residual_target,
    sr_image,
)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255


def test_kernels_are_pillows():
    for ours, theirs in ((EDGE_ENHANCE_MORE, ImageFilter.EDGE_ENHANCE_MORE), (DETAIL, ImageFilter.DETAIL)):
        size, scale, offset, kernel = theirs.filterargs
        assert size == (3, 3) and offset == 0 and scale == ours[1]
        assert tuple(v for row in ours[0] for v in row) == tuple(kernel)


@pytest.mark.parametrize("h, w", [(9, 14), (14, 9)])
def test_filters_match_pillow_on_8bit_images(h, w):
    rng = np.random.default_rng(0)
    # A smooth-ish difference image (little clipping) plus a few sharp spots.
    base = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    base[rng.random((h, w)) < 0.1] = 200
    single = np.asarray(Image.fromarray(base).filter(ImageFilter.EDGE_ENHANCE_MORE))
    both = np.asarray(Image.fromarray(base).filter(ImageFilter.EDGE_ENHANCE_MORE).filter(ImageFilter.DETAIL))
    ours_single = pillow_kernel_filter(to_tensor(base), *EDGE_ENHANCE_MORE)
    ours_both = enhance_residual(to_tensor(base))
    def to_u8(t):
        return (t[0].permute(1, 2, 0) * 255).numpy()
    assert np.abs(to_u8(ours_single) - single).max() <= 0.5 + 1e-9  # Pillow rounds once
    assert np.abs(to_u8(ours_both) - both).max() <= 2.0  # rounding of the intermediate image
    assert (to_u8(ours_both)[0] == base[0]).all() and (to_u8(ours_both)[:, -1] == base[:, -1]).all()
    assert 0 < (both > 0).mean() < 1  # the comparison is not trivially all-zero or all-saturated


def test_residual_target_vanishes_when_hr_is_the_bicubic_upsampling():
    lr = torch.rand(2, 3, 6, 10)
    up = bicubic_up(lr)
    assert up.shape == (2, 3, 12, 20)
    assert residual_target(up, lr).abs().max() == 0
    hr = torch.rand(2, 3, 12, 20)
    target = residual_target(hr, lr)
    assert target.shape == hr.shape and 0 <= target.min() and target.max() <= 1 and target.max() > 0


def test_sr_image_is_bicubic_plus_residual():
    lr, hr = torch.rand(1, 3, 5, 7), torch.rand(1, 3, 10, 14)
    torch.testing.assert_close(sr_image(lr, hr - bicubic_up(lr)), hr)
    assert sr_image(lr, torch.full((1, 3, 10, 14), 2.0)).max() == 1.0
