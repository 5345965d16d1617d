"""The assembled DSRL segmenter (Wang et al., "Dual Super-Resolution Learning", CVPR 2020).

Training model: encoder -> decoder -> SSSR head (logits at 2x input), plus the SISR branch
(2x RGB or residual) and 1x1 feature transforms for the feature-affinity loss.
Inference model (``create_model(config, inference=True)``): only encoder, decoder and SSSR head;
its parameter names are a subset of the training model's, so a training checkpoint loads into
it after :func:`strip_training_branches` (or any filtering to its keys).

Inputs are RGB in [0, 1], (B, 3, H, W) with H and W multiples of ``model.pad_multiple``; the
model normalises them with the ImageNet mean and std itself.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .config import SegmenterConfig
from .decoders import DeepLabDecoder
from .dupsampling import DUpsamplingDecoder
from .encoders import create_encoder
from .layers import ConvBNAct, SubPixelUpsampler, check_divisible, init_weights
from .sisr import SISRBranch

# State-dict prefixes of the modules only the training model has.
TRAINING_ONLY_PREFIXES = ("sisr.", "feature_transform.")


class DSRLOutput(NamedTuple):
    """Training-model output. ``logits`` (B, C, 2H, 2W); ``sr`` (B, 3, 2H, 2W) the SISR
    prediction (image or residual, per ``config.sr_target``); ``f_seg``/``f_sr``
    (B, ft_channels, 2H, 2W) the transformed features for the FA loss. Absent parts are None."""

    logits: torch.Tensor
    sr: torch.Tensor | None = None
    f_seg: torch.Tensor | None = None
    f_sr: torch.Tensor | None = None


class SegmentationHead(nn.Module):
    """Decoder output -> logits at twice the input size.

    With ``sssr``: sub-pixel upsampling to 2x, then a 1x1 classifier (the SSSR head); the
    features before the classifier are returned for the feature transform. Without: a 1x1
    classifier (skipped when the decoder already outputs logits) and bilinear upsampling; the
    upsampled logits stand for the features (what the FA loss compares in Dootmaan/DSRL).
    """

    def __init__(self, in_channels: int, in_stride: int, num_classes: int, sssr: bool,
                 head_channels: int, input_is_logits: bool):
        super().__init__()
        self.sssr = sssr
        if sssr:
            self.upsample = SubPixelUpsampler(in_channels, in_stride, head_channels)
            self.classifier = nn.Conv2d(self.upsample.out_channels, num_classes, 1, bias=True)
            self.out_channels = self.upsample.out_channels
        else:
            self.classifier = None if input_is_logits else nn.Conv2d(in_channels, num_classes, 1, bias=True)
            self.out_channels = num_classes

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sssr:
            features = self.upsample(x)
            return self.classifier(features), features
        logits = x if self.classifier is None else self.classifier(x)
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits, logits


class FeatureTransforms(nn.Module):
    """1x1 conv + BN + ReLU on each branch's last feature map, to ``channels`` channels."""

    def __init__(self, seg_channels: int, sr_channels: int, channels: int):
        super().__init__()
        self.seg = ConvBNAct(seg_channels, channels, 1)
        self.sr = ConvBNAct(sr_channels, channels, 1)


class DSRL(nn.Module):
    """DSRL segmenter. ``forward(x)`` returns logits (inference) or :class:`DSRLOutput` (training).

    Attributes: ``config``, ``inference``, ``pad_multiple``, ``num_classes``,
    ``dupsampling_ratio`` (the r of DUpsampling, None for the DeepLab decoder).
    """

    def __init__(self, config: SegmenterConfig, inference: bool = False):
        super().__init__()
        self.config = config
        self.inference = inference
        self.num_classes = config.num_classes
        self.pad_multiple = config.pad_multiple
        self.encoder = create_encoder(config.encoder, config.output_stride, config.encoder_width)
        enc = self.encoder
        if config.decoder == "deeplab":
            self.decoder = DeepLabDecoder(
                enc.deep_channels, enc.low_channels, config.output_stride, config.aspp_channels,
                config.low_level_channels, config.decoder_channels, config.dropout,
            )
            self.dupsampling_ratio = None
        else:
            self.decoder = DUpsamplingDecoder(
                enc.deep_channels, enc.low_channels, config.output_stride, config.num_classes,
                config.dup_channels, config.low_level_channels, config.decoder_channels, config.dropout,
            )
            self.dupsampling_ratio = self.decoder.ratio
        self.seg_head = SegmentationHead(
            self.decoder.out_channels, self.decoder.out_stride, config.num_classes, config.sssr,
            config.head_channels, self.decoder.outputs_logits,
        )
        self.sisr = None
        self.feature_transform = None
        if not inference and config.sisr:
            self.sisr = SISRBranch(enc.deep_channels, enc.low_channels, config.sr_channels,
                                   config.low_level_channels, config.head_channels, config.sr_target)
            if config.feature_affinity:
                self.feature_transform = FeatureTransforms(
                    self.seg_head.out_channels, self.sisr.out_channels, config.ft_channels
                )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | DSRLOutput:
        """x: (B, 3, H, W) RGB in [0, 1], H and W multiples of ``pad_multiple``."""
        check_divisible(x, self.pad_multiple)
        if x.shape[1] != 3:
            raise ValueError(f"input must have 3 (RGB) channels, got {x.shape[1]}")
        out_size = (2 * x.shape[2], 2 * x.shape[3])
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        low, deep = self.encoder(x)
        logits, seg_features = self.seg_head(self.decoder(deep, low), out_size)
        if self.inference:
            return logits
        sr = f_seg = f_sr = None
        if self.sisr is not None:
            sr, sr_features = self.sisr(deep, low)
            if self.feature_transform is not None:
                f_seg = self.feature_transform.seg(seg_features)
                f_sr = self.feature_transform.sr(sr_features)
        return DSRLOutput(logits, sr, f_seg, f_sr)

    def set_dupsampling_basis(self, basis: torch.Tensor | np.ndarray) -> None:
        """Install the DUpsampling matrix W (dup_channels, r*r*num_classes) from
        ``engine.models.dupsampling.fit_basis`` (fit on labels at the model's input resolution,
        ``ratio=model.dupsampling_ratio``)."""
        if not isinstance(self.decoder, DUpsamplingDecoder):
            raise ValueError("this model has no DUpsampling decoder (config.decoder is not 'dupsampling')")
        self.decoder.set_basis(basis)

    def param_groups(self, lr: float, encoder_lr_scale: float = 1.0,
                     weight_decay: float = 1e-4) -> list[dict[str, Any]]:
        """Optimizer parameter groups covering EVERY trainable parameter exactly once.

        Groups: encoder (``lr * encoder_lr_scale``) and everything else (``lr``): decoder, SSSR
        head, SISR branch including its prediction layer, feature transforms, DUpsampling
        temperature. BatchNorm parameters, biases and the temperature get no weight decay.
        (A public DSRL implementation built its optimizer from backbone+decoder lists only,
        leaving the SR head untrained; this one is checked against ``self.parameters()``.)
        """
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "encoder" if name.startswith("encoder.") else "heads"
            decay = param.ndim > 1
            groups.setdefault((part, decay), []).append(param)
        result = [
            {"params": params, "lr": lr * (encoder_lr_scale if part == "encoder" else 1.0),
             "weight_decay": weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"}
            for (part, decay), params in groups.items()
        ]
        covered = {id(p) for g in result for p in g["params"]}
        expected = {id(p) for p in self.parameters() if p.requires_grad}
        assert covered == expected and sum(len(g["params"]) for g in result) == len(expected)
        return result


def create_model(config: SegmenterConfig, inference: bool = False) -> DSRL:
    """Build a DSRL segmenter. ``inference=True`` builds only encoder, decoder and SSSR head,
    returns logits (B, C, 2H, 2W) from ``forward`` and is put in eval mode."""
    model = DSRL(config, inference=inference)
    return model.eval() if inference else model


def strip_training_branches(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the SISR branch and feature transforms from a training state dict, leaving exactly
    the keys of the inference model built from the same config."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
