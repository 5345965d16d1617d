"""CascadePSP refinement module: a 6-channel PSP network that runs a three-pass cascade.

Input: an ImageNet-normalised RGB image and masks in [-1, 1] (foreground +1). The backbone has
output stride 8 (dilated last stages); pyramid pooling uses bins 1, 2, 3, 6; three upsampling
stages take skips from OS4, OS2 and the RGB image; heads predict at OS8, OS4 and OS1.

Two backbones:

- ``"resnet50"``: parameter names and shapes follow the official CascadePSP checkpoint exactly
  (without its ``module.`` prefix), so its weights load unchanged.
- ``"light"``: a narrow ResNet-18-style network for the CPU default (about 20x fewer
  multiply-adds per 900 x 900 tile than ResNet-50).

The cascade (``RefinementModule.forward``):

- pass 1: ``[rgb, seg, seg, seg]`` -> OS8 logits;
- pass 2: ``[rgb, seg, t8, t8]`` -> OS8 and OS4 logits (``t8`` = tanh of upsampled pass-1 logits);
- pass 3: ``[rgb, seg, t8', t4]`` -> OS8, OS4 and OS1 logits.

Passing ``prev_os8`` skips pass 1 (the local step of the refiner does this); passing ``prev_os4``
as well skips pass 2.

Deviation (``RefinerConfig.mask_skip``, off by default so the ResNet-50 layout stays official): the
last upsampling stage and the OS1 head also receive the input mask at full resolution, beside
the RGB image. In the paper the mask reaches the OS1 output only through the stride-2 stem, so a
small network trained from scratch must relearn where the boundary already is; with the skip it
can keep the input boundary and learn the corrections. At equal training (400 steps from scratch)
the light model with the skip scored +1.5 IoU and +2.5 mBA higher on perturbed val crops (see
docs/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

#: Output names, in the order the reference's loss weights list them.
OUTPUT_NAMES = ("pass3_os1", "pass1_os8", "pass2_os4", "pass2_os8", "pass3_os8", "pass3_os4")

BACKBONES = ("resnet50", "light")


@dataclass
class RefinerConfig:
    """Architecture of a refinement module; ``None`` fields take the backbone's preset.

    - ``backbone``: ``"resnet50"`` (official CascadePSP layout) or ``"light"``.
    - ``stage_channels``: output channels of the four backbone stages (light only; the ResNet-50
      widths are fixed by the official layout).
    - ``stage_blocks``: residual blocks per stage.
    - ``psp_channels``: channels after pyramid pooling (OS8 features).
    - ``decoder_channels``: outputs of the OS4, OS2 and OS1 upsampling stages.
    - ``head_channels``: hidden width of the OS8 and OS4 heads.
    - ``mask_skip``: also give the OS1 decoder stage and head the input mask at full resolution
      (not in the paper; see the module docstring). Off by default; cards written before it
      existed load without it.
    """

    backbone: str = "light"
    stage_channels: tuple[int, int, int, int] | None = None
    stage_blocks: tuple[int, int, int, int] | None = None
    psp_channels: int | None = None
    decoder_channels: tuple[int, int, int] | None = None
    head_channels: int | None = None
    mask_skip: bool = False

    def resolved(self) -> RefinerConfig:
        """A copy with every ``None`` replaced by the backbone's preset."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown refiner backbone {self.backbone!r}; choose one of {BACKBONES}")
        preset = _PRESETS[self.backbone]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, default in preset.items():
            if values[key] is None:
                values[key] = default
        for key in ("stage_channels", "stage_blocks", "decoder_channels"):
            values[key] = tuple(int(v) for v in values[key])
        return replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (for a model card)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefinerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown refiner config field(s): {', '.join(unknown)}")
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)


_PRESETS: dict[str, dict[str, Any]] = {
    # Official CascadePSP: ResNet-50 (bottleneck widths 64..512, x4 expansion), PSP 2048 -> 1024.
    "resnet50": {
        "stage_channels": (256, 512, 1024, 2048),
        "stage_blocks": (3, 4, 6, 3),
        "psp_channels": 1024,
        "decoder_channels": (512, 256, 32),
        "head_channels": 32,
    },
    # Ours: narrow basic-block network; the widths were chosen for a 4K image in under a minute
    # on two CPU cores (see docs/BENCHMARKS.md).
    "light": {
        "stage_channels": (32, 64, 96, 128),
        "stage_blocks": (1, 1, 1, 1),
        "psp_channels": 128,
        "decoder_channels": (32, 16, 8),
        "head_channels": 16,
    },
}


# --------------------------------------------------------------------------------------------
# Backbones. Both return (OS8 features, OS2 skip, OS4 skip) like the reference extractor, where
# the OS2 skip is the stem convolution's output before normalisation.


class Bottleneck(nn.Module):
    """ResNet bottleneck (stride on the 3x3 conv); names match torchvision/CascadePSP."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, both dilated by ``dilation``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet with 6 input channels and output stride 8 (layer3 dilation 2, layer4 dilation 4).

    ``official=True`` builds the exact CascadePSP ResNet-50: 7x7 stem, bottlenecks, and (as in
    the reference) the first block of each dilated stage is not dilated. The light variant uses a
    3x3 stem and dilates every block of a dilated stage.
    """

    def __init__(self, block: type[nn.Module], blocks: tuple[int, ...], out_channels: tuple[int, ...],
                 official: bool):
        super().__init__()
        stem = 64 if official else out_channels[0]
        if official:
            self.conv1 = nn.Conv2d(6, stem, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(6, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stem_channels = stem
        inplanes = stem
        strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        for i, (n, width, stride, dilation) in enumerate(zip(blocks, out_channels, strides, dilations)):
            planes = width // block.expansion
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            first_dilation = 1 if official else dilation
            layers = [block(inplanes, planes, stride, first_dilation, downsample)]
            inplanes = width
            layers += [block(inplanes, planes, 1, dilation) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        os2 = self.conv1(x)
        x = self.maxpool(self.relu(self.bn1(os2)))
        os4 = self.layer1(x)
        x = self.layer4(self.layer3(self.layer2(os4)))
        return x, os2, os4


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Pyramid pooling and decoder (layout of the reference's PSPModule / PSPUpsample).


class PyramidPooling(nn.Module):
    """Average-pool to each bin size, 1x1 conv, upsample, concatenate with the input, 1x1 conv.

    Computed without the concatenation: the bottleneck is linear and bilinear weights sum to one,
    so its share for each prior is applied at the bin size (a few pixels) and the result
    upsampled. Same value as the reference's order of operations (up to float rounding), with
    a 5x smaller bottleneck convolution and no (5C, H, W) concatenated tensor.
    """

    def __init__(self, channels: int, out_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(channels, channels, 1, bias=False)) for b in bins
        )
        self.bottleneck = nn.Conv2d(channels * (len(bins) + 1), out_channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, c = x.shape[-2:], x.shape[1]
        w = self.bottleneck.weight  # input channels: [prior 1, ..., prior n, x], as the reference's cat
        out = F.conv2d(x, w[:, len(self.stages) * c:], self.bottleneck.bias)
        for i, stage in enumerate(self.stages):
            prior = F.conv2d(stage(x), w[:, i * c:(i + 1) * c])
            out = out + F.interpolate(prior, size=size, mode="bilinear", align_corners=False)
        return self.relu(out)


def _preact_convs(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True), nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 3, padding=1),
    )


class UpsampleStage(nn.Module):
    """x2 bilinear upsampling, concatenation with a skip, two pre-activation residual units.

    In eval mode the same function is computed in a cheaper order (``fast_eval``): the first
    BatchNorm and the 1x1 shortcut are applied before upsampling (both are per-pixel affine maps
    and bilinear weights sum to one), and the 3x3 conv over the concatenation is split into one
    conv per part, so neither the concatenation nor a full-resolution copy of it is built.
    """

    def __init__(self, x_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = _preact_convs(x_channels + skip_channels, out_channels)
        self.conv2 = _preact_convs(out_channels, out_channels)
        self.shortcut = nn.Conv2d(x_channels, out_channels, 1)
        self.fast_eval = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        size = skip.shape[-2:]
        if self.training or not self.fast_eval:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            p = self.conv(torch.cat([x, skip], 1)) + self.shortcut(x)
            return p + self.conv2(p)
        cx = x.shape[1]
        bn, conv = self.conv[0], self.conv[2]

        def bn_part(t: torch.Tensor, part: slice) -> torch.Tensor:
            return F.batch_norm(t, bn.running_mean[part], bn.running_var[part], bn.weight[part], bn.bias[part],
                                False, 0.0, bn.eps)

        xa = F.interpolate(bn_part(x, slice(0, cx)), size=size, mode="bilinear", align_corners=False)
        p = F.conv2d(F.relu_(xa), conv.weight[:, :cx], conv.bias, padding=1)
        del xa
        p += F.conv2d(F.relu_(bn_part(skip, slice(cx, None))), conv.weight[:, cx:], None, padding=1)
        p = self.conv[5](self.conv[4](self.conv[3](p)))
        p += F.interpolate(self.shortcut(x), size=size, mode="bilinear", align_corners=False)
        return p + self.conv2(p)


def _head(in_channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))


class RefinementModule(nn.Module):
    """The CascadePSP refinement network; see the module docstring for the cascade."""

    def __init__(self, config: RefinerConfig | None = None):
        super().__init__()
        cfg = (config or RefinerConfig()).resolved()
        self.config = cfg
        official = cfg.backbone == "resnet50"
        block = Bottleneck if official else BasicBlock
        self.feats = DilatedResNet(block, cfg.stage_blocks, cfg.stage_channels, official)
        c_os8, c_os4, c_os2 = cfg.stage_channels[3], cfg.stage_channels[0], self.feats.stem_channels
        d1, d2, d3 = cfg.decoder_channels
        self.psp = PyramidPooling(c_os8, cfg.psp_channels)
        self.up_1 = UpsampleStage(cfg.psp_channels, c_os4, d1)
        self.up_2 = UpsampleStage(d1, c_os2, d2)
        fine = 4 if cfg.mask_skip else 3
        self.up_3 = UpsampleStage(d2, fine, d3)
        self.final_28 = _head(cfg.psp_channels, cfg.head_channels)
        self.final_56 = _head(d1, cfg.head_channels)
        self.final_11 = nn.Conv2d(d3 + fine, d3, 1)
        self.final_21 = nn.Conv2d(d3, 1, 1)

    def _encode(self, image: torch.Tensor, seg: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        feats, os2, os4 = self.feats(torch.cat([image, seg, a, b], 1))
        return self.psp(feats), os2, os4

    def forward(self, image: torch.Tensor, seg: torch.Tensor, prev_os8: torch.Tensor | None = None,
                prev_os4: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the cascade.

        image: (B, 3, H, W) ImageNet-normalised; seg: (B, 1, H, W) in [-1, 1]; H and W multiples
        of 8. ``prev_os8`` / ``prev_os4``: (B, 1, H, W) earlier estimates in [-1, 1] that replace
        passes 1 / 2. Returns logits, all (B, 1, H, W), under the names in ``OUTPUT_NAMES`` for
        the passes that ran (``pass1_*`` only without ``prev_os8``, ``pass2_*`` only without
        ``prev_os4``).
        """
        size = image.shape[-2:]

        def up(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        out: dict[str, torch.Tensor] = {}
        if prev_os8 is None:
            p, _, _ = self._encode(image, seg, seg, seg)
            out["pass1_os8"] = up(self.final_28(p))
            prev_os8 = torch.tanh(out["pass1_os8"])
        if prev_os4 is None:
            p, _, os4 = self._encode(image, seg, prev_os8, prev_os8)
            out["pass2_os8"] = up(self.final_28(p))
            out["pass2_os4"] = up(self.final_56(self.up_1(p, os4)))
            prev_os8, prev_os4 = torch.tanh(out["pass2_os8"]), torch.tanh(out["pass2_os4"])
        p, os2, os4 = self._encode(image, seg, prev_os8, prev_os4)
        out["pass3_os8"] = up(self.final_28(p))
        p = self.up_1(p, os4)
        out["pass3_os4"] = up(self.final_56(p))
        fine = torch.cat([image, seg], 1) if self.config.mask_skip else image
        p = self.up_3(self.up_2(p, os2), fine)
        p = F.relu(self.final_11(torch.cat([p, fine], 1)), inplace=True)
        out["pass3_os1"] = self.final_21(p)
        return out


def build_refinement_module(config: RefinerConfig | dict[str, Any] | None = None) -> RefinementModule:
    """Build an untrained module from a config (or a card's config dict)."""
    if isinstance(config, dict):
        config = RefinerConfig.from_dict(config)
    return RefinementModule(config)


def normalise_image(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised, same dtype and device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing ``bn(conv(x))`` (eval-mode BatchNorm)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_for_inference(model: RefinementModule) -> RefinementModule:
    """An eval-mode copy with every BatchNorm that directly follows a conv folded into it.

    Same outputs (up to float rounding) with fewer full-size memory passes. The stem's BatchNorm
    stays (its conv's raw output is the OS2 skip), as do the pre-activation BatchNorms of the
    decoder. The copy is for inference only: its state dict no longer has the official layout.
    """
    import copy

    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, (Bottleneck, BasicBlock)):
            pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if hasattr(module, "conv3") else [])
            for c, b in pairs:
                setattr(module, c, _fold_bn(getattr(module, c), getattr(module, b)))
                setattr(module, b, nn.Identity())
            if module.downsample is not None:
                module.downsample = _fold_bn(module.downsample[0], module.downsample[1])
        elif isinstance(module, UpsampleStage):
            for seq in (module.conv, module.conv2):
                seq[2] = _fold_bn(seq[2], seq[3])
                seq[3] = nn.Identity()
    return fused
