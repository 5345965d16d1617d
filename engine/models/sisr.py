"""Single-image super-resolution (SISR) branch of DSRL, used only during training.

It shares the encoder with the segmentation branch, has its own decoder and a sub-pixel head
that produces a 3-channel map at twice the input size: the RGB image (``sr_target="image"``)
or the SRNet-style residual (``sr_target="residual"``, see ``training.sr_target``), in which
case MPR-SA attention (SRNet, Qiu et al.) is added to its decoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNAct, SubPixelUpsampler


class ChannelAttention(nn.Module):
    """Squeeze-excitation gate: global average pool, 1x1 down by ``reduction``, ReLU, 1x1 up,
    sigmoid; the input is scaled per channel. Shape preserved."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)
        self.custom_init()

    def custom_init(self) -> None:
        """Start with every hidden unit active (small weights, bias 1): with few hidden units
        (C // 16) a He-initialised ReLU bottleneck is often dead for all inputs (its inputs
        are non-negative pooled activations), and a dead gate never receives a gradient."""
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.ones_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.up(F.relu(self.down(w))))


def channel_group_means(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Average of ``groups`` consecutive channel groups: (B, C, H, W) -> (B, groups, H, W).

    Uses adaptive pooling over the channel axis, so C need not be divisible by ``groups``."""
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (groups, x.shape[2], x.shape[3])).squeeze(1)


class RotationSpatialAttention(nn.Module):
    """Multi-pooling rotation spatial attention.

    For each pooling level g in ``groups`` (1, 2, 4): the channel-group average maps (g maps)
    are rotated by 0, 90, 180 and 270 degrees; each rotation goes through the level's 7x7 conv,
    is rotated back, and the four are stacked for the level's BatchNorm (statistics over all
    four, as if they were one batch) and summed. The levels are summed and a sigmoid gives one
    spatial map that scales every channel.

    Deviations from the SRNet reference, made so any H x W works: the reference concatenates
    the four rotations along channels before one conv (only possible for square maps) and tiles
    8 attention maps over the channels (needs C divisible by 8). Here each rotation is convolved
    in its own frame and rotated back before summing, which needs no padding and makes the
    module exactly rotation-equivariant: ``f(rot90(x)) == rot90(f(x))``; one map gates all channels.
    """

    def __init__(self, groups: tuple[int, ...] = (1, 2, 4), kernel_size: int = 7):
        super().__init__()
        self.groups = tuple(groups)
        self.convs = nn.ModuleList(
            nn.Conv2d(g, 1, kernel_size, padding=kernel_size // 2, bias=False) for g in self.groups
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(1) for _ in self.groups)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W) pre-sigmoid attention."""
        total = None
        for g, conv, norm in zip(self.groups, self.convs, self.norms):
            maps = channel_group_means(x, g)
            rotated_back = [torch.rot90(conv(torch.rot90(maps, k, (2, 3))), -k, (2, 3)) for k in range(4)]
            stacked = norm(torch.cat(rotated_back, dim=0))  # (4B, 1, H, W)
            level = stacked.reshape(4, x.shape[0], 1, x.shape[2], x.shape[3]).sum(dim=0)
            total = level if total is None else total + level
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.attention_logits(x))


class MPRSA(nn.Module):
    """MPR-SA: channel attention followed by multi-pooling rotation spatial attention."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = RotationSpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class SRDecoder(nn.Module):
    """The SISR branch's own decoder: 1x1 projection of the deep features, bilinear upsampling
    to the stride-4 skip, concatenation with the skip's own 1x1 projection, two 3x3 conv-BN-ReLU,
    then MPR-SA when ``attention``. Output (B, channels, H/4, W/4)."""

    out_stride = 4

    def __init__(self, deep_channels: int, low_channels: int, channels: int = 64,
                 low_level_channels: int = 32, attention: bool = False):
        super().__init__()
        self.reduce = ConvBNAct(deep_channels, channels, 1)
        self.skip = ConvBNAct(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(channels + low_level_channels, channels, 3),
            ConvBNAct(channels, channels, 3),
        )
        self.attention = MPRSA(channels) if attention else None
        self.out_channels = channels

    def forward(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(deep), size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.skip(low)], dim=1))
        return x if self.attention is None else self.attention(x)


class SISRBranch(nn.Module):
    """Decoder + sub-pixel head to 2x input + 1x1 prediction of 3 channels.

    ``forward(deep, low) -> (sr, features)``: ``sr`` (B, 3, 2H, 2W) is the RGB image or the
    residual (see ``target``), ``features`` (B, head_out, 2H, 2W) the last map before the
    prediction layer (input to the feature transform).
    """

    def __init__(self, deep_channels: int, low_channels: int, channels: int = 64,
                 low_level_channels: int = 32, head_channels: int = 32, target: str = "image"):
        super().__init__()
        self.target = target
        self.decoder = SRDecoder(deep_channels, low_channels, channels, low_level_channels,
                                 attention=target == "residual")
        self.upsample = SubPixelUpsampler(channels, SRDecoder.out_stride, head_channels)
        self.predict = nn.Conv2d(self.upsample.out_channels, 3, 1, bias=True)
        self.out_channels = self.upsample.out_channels

    def forward(self, deep: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.upsample(self.decoder(deep, low))
        return self.predict(features), features
