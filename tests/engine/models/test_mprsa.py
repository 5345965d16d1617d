"""MPR-SA (SISR branch attention): non-square inputs, rotation consistency, channel groups."""
import pytest
import torch

from engine.models.sisr import MPRSA, ChannelAttention, RotationSpatialAttention, channel_group_means

torch.set_num_threads(1)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN non-trivial running stats/affine so eval mode is not the identity transform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return module


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("h, w", [(6, 10), (10, 6), (7, 12)])
def test_mprsa_keeps_non_square_shapes_and_is_rotation_equivariant(train, h, w):
    torch.manual_seed(0)
    module = randomised(MPRSA(32)).train(train)
    x = torch.randn(2, 32, h, w)
    with torch.no_grad():
        y = module(x)
        assert y.shape == x.shape
        assert not torch.allclose(y, x)
        for k in (1, 2, 3):
            rotated = module(torch.rot90(x, k, (2, 3)))
            torch.testing.assert_close(rotated, torch.rot90(y, k, (2, 3)), atol=1e-5, rtol=1e-5)


def test_spatial_attention_uses_every_pooling_level_and_all_four_rotations():
    torch.manual_seed(1)
    module = RotationSpatialAttention().eval()
    x = torch.randn(1, 12, 5, 9)
    with torch.no_grad():
        expected = torch.zeros(1, 1, 5, 9)
        for g, conv, bn in zip((1, 2, 4), module.convs, module.norms):
            maps = channel_group_means(x, g)
            for k in range(4):  # each rotation through the conv, rotated back, BN (eval: affine per map)
                expected += bn(torch.rot90(conv(torch.rot90(maps, k, (2, 3))), -k, (2, 3)))
        torch.testing.assert_close(module.attention_logits(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x), x * torch.sigmoid(expected), atol=1e-5, rtol=1e-5)
    # A conv kernel that is not rotation-symmetric still yields an equivariant attention map.
    assert not torch.allclose(module.convs[0].weight, torch.rot90(module.convs[0].weight, 1, (2, 3)))


def test_channel_group_means_average_consecutive_groups():
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(channel_group_means(x, 4), x.reshape(2, 4, 2, 3, 5).mean(2))
    torch.testing.assert_close(channel_group_means(x, 1), x.mean(1, keepdim=True))
    odd = torch.randn(1, 6, 2, 3)  # 6 channels in 4 groups: adaptive bins [0,2), [1,3), [3,5), [4,6)
    expected = torch.stack([odd[:, 0:2].mean(1), odd[:, 1:3].mean(1), odd[:, 3:5].mean(1), odd[:, 4:6].mean(1)], 1)
    torch.testing.assert_close(channel_group_means(odd, 4), expected)


def test_channel_attention_reduces_by_16_and_gates_per_channel():
    module = ChannelAttention(64)
    assert module.down.out_channels == 4 and module.up.out_channels == 64
    x = torch.rand(1, 64, 3, 7)
    with torch.no_grad():
        gate = torch.sigmoid(module.up(torch.relu(module.down(x.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(module(x), x * gate)
