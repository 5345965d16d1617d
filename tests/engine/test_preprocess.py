"""engine.preprocess: strip-wise upsampling equals torch's bilinear; sizes and padding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.preprocess import fit_longer_side, pad_to_multiple, upsample_rows


@pytest.mark.parametrize("low,size", [((5, 7), (37, 23)), ((16, 16), (16, 48)), ((3, 4), (300, 401))])
def test_upsample_rows_matches_interpolate(low, size):
    x = torch.rand(3, *low)
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    strips = [upsample_rows(x, size, r, min(size[0], r + 10)) for r in range(0, size[0], 10)]
    torch.testing.assert_close(torch.cat(strips, dim=1), ref, atol=1e-5, rtol=0)


def test_fit_longer_side_and_padding():
    assert fit_longer_side(360, 480, 240) == (180, 240)
    assert fit_longer_side(4000, 10, 100) == (100, 1)
    x, (h, w) = pad_to_multiple(torch.rand(1, 3, 33, 17), 16)
    assert x.shape[-2:] == (48, 32) and (h, w) == (33, 17)
    assert torch.equal(x[..., 40, :17], x[..., 32, :17])  # replicated bottom row
