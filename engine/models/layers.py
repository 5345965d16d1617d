"""Building blocks shared by the encoders, decoders and heads of the DSRL segmenter."""
from __future__ import annotations

import math

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never
    dropping more than 10% (the MobileNet convention for width multipliers)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias: the BatchNorm that follows cancels it) + BatchNorm2d + activation.

    ``padding`` keeps the spatial size at stride 1 for odd kernels, dilation included.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.ReLU,
    ):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        if activation is not None:
            self.add_module("act", activation(inplace=True))
        self.out_channels = out_channels


class SubPixelStage(nn.Sequential):
    """One learnable 2x upsampling step: 3x3 conv to ``4 * out`` channels, PixelShuffle(2), BN, ReLU.

    (B, in, h, w) -> (B, out, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1, bias=False))
        self.add_module("shuffle", nn.PixelShuffle(2))
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        self.add_module("act", nn.ReLU(inplace=True))


class SubPixelUpsampler(nn.Sequential):
    """Chain of :class:`SubPixelStage` s taking features at ``in_stride`` to ``1/2`` of the input
    stride, i.e. twice the network input size (``log2(2 * in_stride)`` stages).

    Stage ``i`` has ``max(8, channels >> i)`` output channels, so the costly full-resolution
    stages stay narrow. Inputs wider than ``channels`` are first reduced by a 1x1 conv-BN-ReLU
    (``reduce``), which makes the first 3x3 stage several times cheaper. ``out_channels`` is the
    width of the last stage.
    """

    def __init__(self, in_channels: int, in_stride: int, channels: int):
        super().__init__()
        factor = 2 * in_stride
        stages = round(math.log2(factor))
        if 2**stages != factor:
            raise ValueError(f"in_stride must be a power of two, got {in_stride}")
        width = in_channels
        if in_channels > channels:
            self.add_module("reduce", ConvBNAct(in_channels, channels, 1))
            width = channels
        for i in range(stages):
            out = max(8, channels >> i)
            self.add_module(f"stage{i}", SubPixelStage(width, out))
            width = out
        self.out_channels = width


def init_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorm to identity, zero biases; then each
    submodule's own ``custom_init()`` where it defines one."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if callable(getattr(m, "custom_init", None)):
            m.custom_init()


def check_divisible(x: torch.Tensor, multiple: int, what: str = "input") -> None:
    """Raise ValueError unless ``x`` is (B, C, H, W) with H and W multiples of ``multiple``."""
    if x.dim() != 4:
        raise ValueError(f"{what} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(
            f"{what} height and width must be positive multiples of {multiple} (pad first), got {h}x{w}"
        )
