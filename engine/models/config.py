"""Configuration of the DSRL segmenter: one dataclass, JSON-serialisable with ``dataclasses.asdict``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ENCODERS = ("mobile", "resnet18", "resnet34", "resnet50")
DECODERS = ("deeplab", "dupsampling")
SR_TARGETS = ("image", "residual")
OUTPUT_STRIDES = (8, 16)

# Ablation variants: the switches each one sets. Everything else keeps the dataclass defaults
# unless overridden.
VARIANTS: dict[str, dict[str, Any]] = {
    # No SSSR head: logits are upsampled bilinearly to twice the input size.
    "baseline": dict(sssr=False, sisr=False, feature_affinity=False),
    "sssr": dict(sssr=True, sisr=False, feature_affinity=False),
    "sssr_sisr": dict(sssr=True, sisr=True, feature_affinity=False),
    "dsrl": dict(sssr=True, sisr=True, feature_affinity=True),
    "dsrl_dup": dict(sssr=True, sisr=True, feature_affinity=True, decoder="dupsampling"),
    "dsrl_res": dict(sssr=True, sisr=True, feature_affinity=True, sr_target="residual"),
    # DSRL with the baseline's bilinear 2x upsampling in place of the SSSR head, as the Dootmaan/DSRL
    # implementation builds it: SISR branch and FA on the upsampled logits; inference = baseline.
    "dsrl_bilinear": dict(sssr=False, sisr=True, feature_affinity=True),
}


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a DSRL segmenter.

    Model switches:
      - ``encoder``: ``"mobile"`` (inverted residuals, the CPU default) or ``"resnet18/34/50"``.
      - ``output_stride``: 8 or 16, reached with dilation; inputs must be multiples of it.
      - ``decoder``: ``"deeplab"`` (ASPP + OS4 skip) or ``"dupsampling"`` (data-dependent upsampling).
      - ``sssr``: learnable sub-pixel upsampling to 2x input; without it logits are upsampled bilinearly.
      - ``sisr``: training-only super-resolution branch; ``sr_target`` ``"image"`` predicts the
        2x RGB image, ``"residual"`` the SRNet-style residual (and adds MPR-SA to that branch).
      - ``feature_affinity``: feature transforms on both branches for the FA loss (needs sisr); the
        segmentation side is the SSSR head's features, or without it the upsampled logits.

    Widths: ``encoder_width`` multiplies the encoder's channel counts; ``aspp_channels``,
    ``low_level_channels`` (OS4 skip projection) and ``decoder_channels`` size the decoder;
    ``head_channels`` is the first sub-pixel stage width (halved per stage, at least 8);
    ``sr_channels`` the SISR decoder width; ``ft_channels`` the common feature-transform width;
    ``dup_channels`` the DUpsampling code size C' (W is ``dup_channels x r*r*num_classes``).

    Loss weights (read by the trainer): ``sr_weight`` for the SR MSE, ``fa_weight`` for the
    feature-affinity loss, pooled by ``fa_stride``.
    """

    num_classes: int
    encoder: str = "mobile"
    output_stride: int = 16
    decoder: str = "deeplab"
    sssr: bool = True
    sisr: bool = True
    feature_affinity: bool = True
    sr_target: str = "image"
    encoder_width: float = 1.0
    aspp_channels: int = 128
    low_level_channels: int = 32
    decoder_channels: int = 128
    head_channels: int = 32
    sr_channels: int = 64
    ft_channels: int = 16
    dup_channels: int = 64
    dropout: float = 0.1
    sr_weight: float = 0.1
    fa_weight: float = 1.0
    fa_stride: int = 8

    def __post_init__(self) -> None:
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("encoder", ENCODERS)
        choice("decoder", DECODERS)
        choice("sr_target", SR_TARGETS)
        choice("output_stride", OUTPUT_STRIDES)
        for name in ("num_classes", "aspp_channels", "low_level_channels", "decoder_channels",
                     "head_channels", "sr_channels", "ft_channels", "dup_channels", "fa_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.encoder_width > 0:
            raise ValueError(f"encoder_width must be positive, got {self.encoder_width!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.feature_affinity and not self.sisr:
            raise ValueError("feature_affinity needs the SISR branch (sisr=True)")
        if self.sr_target == "residual" and not self.sisr:
            raise ValueError("sr_target='residual' needs the SISR branch (sisr=True)")

    @property
    def pad_multiple(self) -> int:
        """Inputs must have height and width divisible by this."""
        return self.output_stride

    @classmethod
    def for_variant(cls, name: str, num_classes: int, **overrides: Any) -> SegmenterConfig:
        """The config of an ablation variant (see ``VARIANTS``); ``overrides`` win over the variant."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
        return cls(num_classes=num_classes, **{**VARIANTS[name], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmenterConfig:
        """Inverse of ``dataclasses.asdict``; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown segmenter config field(s): {', '.join(unknown)}")
        if "num_classes" not in data:
            raise ValueError("segmenter config lacks num_classes")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def without_training_branches(self) -> SegmenterConfig:
        """The same network with no SISR branch and no feature transforms (what inference builds)."""
        return replace(self, sisr=False, feature_affinity=False, sr_target="image")
