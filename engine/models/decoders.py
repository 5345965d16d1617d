"""DeepLabv3+-style decoder: ASPP on the deep features, fused with the stride-4 skip.

Decoders share a small interface: ``forward(deep, low) -> features`` plus the attributes
``out_channels``, ``out_stride`` (stride of the output w.r.t. the network input) and
``outputs_logits`` (True when the output already holds per-class scores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNAct


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image pooling,
    concatenated and projected to ``out_channels``. (B, in, h, w) -> (B, out, h, w).

    Rates are (6, 12, 18) at output stride 16 and doubled at 8, as in DeepLabv3.
    """

    def __init__(self, in_channels: int, out_channels: int, output_stride: int, dropout: float = 0.1):
        super().__init__()
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.branches = nn.ModuleList(
            [ConvBNAct(in_channels, out_channels, 1)]
            + [ConvBNAct(in_channels, out_channels, 3, dilation=r) for r in rates]
        )
        # Image-pooling branch without BatchNorm (DeepLab has one): BN over a 1x1 map fails on a
        # batch of one and is noisy on small batches; a biased 1x1 conv + ReLU does the same job.
        self.pool_conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.project = ConvBNAct(5 * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = F.relu(self.pool_conv(x.mean(dim=(2, 3), keepdim=True)))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class DeepLabDecoder(nn.Module):
    """DeepLabv3+ decoder: ASPP(deep) upsampled bilinearly to the stride-4 skip, concatenated with
    a 1x1 projection of it, then two 3x3 conv-BN-ReLU. Output (B, decoder_channels, H/4, W/4).
    """

    outputs_logits = False
    out_stride = 4

    def __init__(
        self,
        deep_channels: int,
        low_channels: int,
        output_stride: int,
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.aspp = ASPP(deep_channels, aspp_channels, output_stride, dropout)
        self.skip = ConvBNAct(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(aspp_channels + low_level_channels, decoder_channels, 3),
            ConvBNAct(decoder_channels, decoder_channels, 3),
        )
        self.out_channels = decoder_channels

    def forward(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.aspp(deep)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.skip(low)], dim=1))
