"""Encoders: strides of both outputs, channel counts, standard parameter counts."""
import pytest
import torch

from engine.models.encoders import MobileEncoder, ResNetEncoder, create_encoder

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["mobile", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("output_stride, size", [(8, (40, 56)), (16, (80, 48))])
def test_low_is_stride_4_and_deep_is_output_stride(name, output_stride, size):
    enc = create_encoder(name, output_stride, width=0.25).eval()
    h, w = size
    with torch.no_grad():
        low, deep = enc(torch.rand(1, 3, h, w))
    assert low.shape == (1, enc.low_channels, h // 4, w // 4)
    assert deep.shape == (1, enc.deep_channels, h // output_stride, w // output_stride)


def test_full_width_parameter_counts_match_the_standard_networks():
    # torchvision's resnet18/34/50 minus the fc layer, and MobileNetV2 minus its 1280-channel
    # conv (+BN) and classifier.
    assert sum(p.numel() for p in ResNetEncoder(18).parameters()) == 11_689_512 - 513_000
    assert sum(p.numel() for p in ResNetEncoder(34).parameters()) == 21_797_672 - 513_000
    assert sum(p.numel() for p in ResNetEncoder(50).parameters()) == 25_557_032 - 2_049_000
    assert sum(p.numel() for p in MobileEncoder().parameters()) == 3_504_872 - 1_281_000 - 409_600 - 2_560


def test_resnet_parameter_names_follow_torchvision_layout():
    names = set(ResNetEncoder(50, width=0.25).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"} <= names


def test_dilation_keeps_receptive_field_growing_at_output_stride_8():
    # At OS 8, layer3/layer4 convolutions are dilated rather than strided.
    enc = ResNetEncoder(18, output_stride=8, width=0.25)
    assert enc.layer3[0].conv1.stride == (1, 1) and enc.layer3[1].conv1.dilation == (2, 2)
    assert enc.layer4[1].conv1.dilation == (4, 4)
