"""SegmenterConfig: variants, validation, JSON round trip."""
import json
from dataclasses import asdict

import pytest

from engine.models import VARIANTS, SegmenterConfig


def test_variants_set_the_documented_switches():
    flags = {
        name: (c.sssr, c.sisr, c.feature_affinity, c.decoder, c.sr_target)
        for name in VARIANTS
        for c in [SegmenterConfig.for_variant(name, 4)]
    }
    assert flags == {
        "baseline": (False, False, False, "deeplab", "image"),
        "sssr": (True, False, False, "deeplab", "image"),
        "sssr_sisr": (True, True, False, "deeplab", "image"),
        "dsrl": (True, True, True, "deeplab", "image"),
        "dsrl_dup": (True, True, True, "dupsampling", "image"),
        "dsrl_res": (True, True, True, "deeplab", "residual"),
        "dsrl_bilinear": (False, True, True, "deeplab", "image"),
    }


def test_overrides_win_over_variant_and_unknown_variant_is_named():
    c = SegmenterConfig.for_variant("dsrl_dup", 7, encoder="resnet34", output_stride=8, decoder="deeplab")
    assert (c.num_classes, c.encoder, c.output_stride, c.decoder) == (7, "resnet34", 8, "deeplab")
    with pytest.raises(ValueError, match="dsrl_res"):
        SegmenterConfig.for_variant("nope", 3)


def test_json_round_trip():
    c = SegmenterConfig.for_variant("dsrl_res", 5, encoder="resnet18", head_channels=16)
    text = json.dumps(asdict(c))
    assert SegmenterConfig.from_dict(json.loads(text)) == c
    with pytest.raises(ValueError, match="bogus"):
        SegmenterConfig.from_dict({**asdict(c), "bogus": 1})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder="vgg"), "encoder"),
        (dict(output_stride=32), "output_stride"),
        (dict(decoder="unet"), "decoder"),
        (dict(sr_target="edges"), "sr_target"),
        (dict(num_classes=0), "num_classes"),
        (dict(sisr=False), "feature_affinity"),
        (dict(sssr=False, sisr=False), "feature_affinity"),
        (dict(feature_affinity=False, sisr=False, sr_target="residual"), "residual"),
        (dict(encoder_width=0), "encoder_width"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmenterConfig(**{"num_classes": 3, **kwargs})
