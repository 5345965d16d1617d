"""Encoders defined in the project (no torchvision): ResNet-18/34/50 and a MobileNetV2-style one.

Every encoder maps (B, 3, H, W) to ``(low, deep)``: ``low`` at stride 4 with ``low_channels``
channels, ``deep`` at ``output_stride`` (8 or 16, reached by replacing strides with dilation)
with ``deep_channels`` channels. H and W must be multiples of ``output_stride``.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct, make_divisible

# --------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNetEncoder(nn.Module):
    """ResNet with torchvision-style parameter names (``conv1``, ``bn1``, ``layer1..4``).

    Output stride 16 dilates ``layer4`` (rate 2); output stride 8 dilates ``layer3`` (2) and
    ``layer4`` (4). ``width`` multiplies every channel count (1.0 is the standard network).
    """

    def __init__(self, depth: int = 18, output_stride: int = 16, width: float = 1.0):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        block, counts = RESNET_LAYOUTS[depth]
        base = make_divisible(64 * width)
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # (stride, dilation) of layer2..4
        if output_stride == 16:
            plan = [(2, 1), (2, 1), (1, 2)]
        else:
            plan = [(2, 1), (1, 2), (1, 4)]
        self._in = base
        self.layer1 = self._make_layer(block, base, counts[0], 1, 1)
        self.layer2 = self._make_layer(block, 2 * base, counts[1], *plan[0])
        self.layer3 = self._make_layer(block, 4 * base, counts[2], *plan[1])
        self.layer4 = self._make_layer(block, 8 * base, counts[3], *plan[2])
        self.low_channels = base * block.expansion
        self.deep_channels = 8 * base * block.expansion
        self.output_stride = output_stride

    def _make_layer(self, block, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        blocks = [block(self._in, planes, stride, dilation)]
        self._in = planes * block.expansion
        blocks += [block(self._in, planes, 1, dilation) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        deep = self.layer4(self.layer3(self.layer2(low)))
        return low, deep


# ----------------------------------------------------------------------------- Mobile encoder


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (t), 3x3 depthwise (stride, dilation), 1x1 linear project."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, activation=nn.ReLU6))
        layers.append(ConvBNAct(hidden, hidden, 3, stride, dilation, groups=hidden, activation=nn.ReLU6))
        layers.append(ConvBNAct(hidden, out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# MobileNetV2 stages: (expansion t, channels c, repeats n, stride s). The 1280-channel
# classifier conv of the original is left out (DeepLab's mobile encoder stops at 320 too).
MOBILE_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileEncoder(nn.Module):
    """Light inverted-residual encoder (MobileNetV2 layout), the CPU default.

    ``low`` is the output of the 24-channel stage (stride 4); strides beyond ``output_stride``
    become dilations. ``width`` is the usual width multiplier.
    """

    def __init__(self, output_stride: int = 16, width: float = 1.0):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        stem = make_divisible(32 * width)
        low_layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, activation=nn.ReLU6)]
        deep_layers: list[nn.Module] = []
        in_channels, stride, dilation = stem, 2, 1
        for t, c, n, s in MOBILE_STAGES:
            out = make_divisible(c * width)
            if stride * s > output_stride:  # keep the resolution, dilate instead
                block_stride, next_dilation = 1, dilation * s
            else:
                block_stride, next_dilation = s, dilation
                stride *= s
            for i in range(n):
                # the first block of a stage keeps the previous dilation (as the stride it replaces did)
                block = InvertedResidual(in_channels, out, block_stride if i == 0 else 1, t,
                                         dilation if i == 0 else next_dilation)
                (low_layers if stride <= 4 else deep_layers).append(block)
                in_channels = out
            dilation = next_dilation
            if stride <= 4:
                self.low_channels = out
        self.low = nn.Sequential(*low_layers)
        self.deep = nn.Sequential(*deep_layers)
        self.deep_channels = in_channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low(x)
        return low, self.deep(low)


def create_encoder(name: str, output_stride: int = 16, width: float = 1.0) -> nn.Module:
    """``"mobile"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``."""
    if name == "mobile":
        return MobileEncoder(output_stride, width)
    if name.startswith("resnet") and name[6:].isdigit():
        return ResNetEncoder(int(name[6:]), output_stride, width)
    raise ValueError(f"unknown encoder {name!r}")
