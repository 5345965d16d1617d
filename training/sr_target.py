"""SRNet-style residual target for the SISR branch (``sr_target="residual"``).

target = DETAIL(EDGE_ENHANCE_MORE(|HR - bicubic_up(LR)|)), the two filters being Pillow's 3x3
kernels applied with torch the way Pillow applies them to 8-bit images: weighted sum divided
by the kernel's scale, clipped to the valid range, the one-pixel border copied from the input.
The SR image is then ``bicubic_up(LR) + predicted residual``.

Images are float tensors (B, 3, H, W) in [0, 1]; HR is (B, 3, 2H, 2W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Pillow's ImageFilter.EDGE_ENHANCE_MORE and ImageFilter.DETAIL: (kernel rows, scale).
EDGE_ENHANCE_MORE = (((-1, -1, -1), (-1, 9, -1), (-1, -1, -1)), 1)
DETAIL = (((0, -1, 0), (-1, 10, -1), (0, -1, 0)), 6)


def bicubic_up(lr: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic upsampling (align_corners=False) to ``size`` (default 2x), clipped to [0, 1]."""
    size = size or (2 * lr.shape[-2], 2 * lr.shape[-1])
    return F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def pillow_kernel_filter(image: torch.Tensor, kernel: tuple, scale: float) -> torch.Tensor:
    """Apply a 3x3 Pillow kernel to (B, C, H, W) in [0, 1]: per-channel correlation divided by
    ``scale``, clipped to [0, 1]; border pixels keep their input values (as Pillow does)."""
    weight = torch.tensor(kernel, dtype=image.dtype, device=image.device) / scale
    channels = image.shape[1]
    weight = weight.view(1, 1, 3, 3).expand(channels, 1, 3, 3)
    inner = F.conv2d(image, weight, groups=channels).clamp(0.0, 1.0)  # (B, C, H-2, W-2)
    out = image.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def enhance_residual(difference: torch.Tensor) -> torch.Tensor:
    """EDGE_ENHANCE_MORE then DETAIL on an absolute-difference image (B, C, H, W) in [0, 1]."""
    return pillow_kernel_filter(pillow_kernel_filter(difference, *EDGE_ENHANCE_MORE), *DETAIL)


@torch.no_grad()
def residual_target(hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """SRNet residual target (B, 3, 2H, 2W) in [0, 1] for HR (B, 3, 2H, 2W) and LR (B, 3, H, W)."""
    up = bicubic_up(lr, hr.shape[-2:])
    return enhance_residual((hr - up).abs())


def sr_image(lr: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """SR image from the predicted residual: ``bicubic_up(lr) + residual``, clipped to [0, 1]."""
    return (bicubic_up(lr, residual.shape[-2:]) + residual).clamp(0.0, 1.0)
