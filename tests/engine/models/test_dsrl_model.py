"""The assembled DSRL segmenter: shapes for every variant and encoder (non-square), gradients on
every parameter, inference FLOPs, training -> inference state dicts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.models import VARIANTS, DSRLOutput, SegmenterConfig, create_model, strip_training_branches
from training.losses import dsrl_loss

torch.set_num_threads(1)
TINY = dict(encoder_width=0.25, aspp_channels=16, low_level_channels=8, decoder_channels=16,
            head_channels=16, sr_channels=16, ft_channels=8, dup_channels=16)


def tiny(variant, num_classes=3, **kw):
    return SegmenterConfig.for_variant(variant, num_classes, **{**TINY, **kw})


def check_output(out, config, batch, h, w):
    assert isinstance(out, DSRLOutput)
    assert out.logits.shape == (batch, config.num_classes, 2 * h, 2 * w)
    assert (out.sr is None) == (not config.sisr)
    if config.sisr:
        assert out.sr.shape == (batch, 3, 2 * h, 2 * w)
    assert (out.f_seg is None) == (out.f_sr is None) == (not config.feature_affinity)
    if config.feature_affinity:
        assert out.f_seg.shape == out.f_sr.shape == (batch, config.ft_channels, 2 * h, 2 * w)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("h, w", [(40, 56), (56, 40)])
def test_every_variant_gives_twice_the_input_size_on_non_square_inputs(variant, h, w):
    config = tiny(variant, num_classes=5, output_stride=8)
    model = create_model(config)
    check_output(model(torch.rand(2, 3, h, w)), config, 2, h, w)
    inference = create_model(config, inference=True)
    with torch.no_grad():
        assert inference(torch.rand(1, 3, h, w)).shape == (1, 5, 2 * h, 2 * w)


@pytest.mark.parametrize("encoder", ["mobile", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("variant, output_stride, shapes", [
    ("dsrl_res", 8, [(40, 56), (56, 40)]),
    ("dsrl_dup", 16, [(48, 80), (80, 48)]),
])
def test_every_encoder_gives_twice_the_input_size(encoder, variant, output_stride, shapes):
    config = tiny(variant, encoder=encoder, output_stride=output_stride)
    model = create_model(config)
    assert model.pad_multiple == output_stride
    for h, w in shapes:
        check_output(model(torch.rand(2, 3, h, w)), config, 2, h, w)


def test_inputs_that_are_not_padded_are_refused_clearly():
    model = create_model(tiny("dsrl", output_stride=16), inference=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 40, 56))
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        model(torch.rand(1, 4, 32, 32))


@pytest.mark.parametrize("variant, encoder", [("dsrl", "resnet18"), ("dsrl_dup", "mobile"), ("dsrl_res", "mobile"),
                                             ("dsrl_bilinear", "mobile")])
def test_one_backward_reaches_every_parameter_and_the_optimizer_holds_them_all(variant, encoder):
    torch.manual_seed(0)
    config = tiny(variant, encoder=encoder, output_stride=8)
    model = create_model(config)
    x, hr = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 80, 112)
    labels = torch.randint(0, 3, (2, 80, 112))
    labels[:, :8] = 255
    loss = dsrl_loss(model(x), labels, hr, lr=x, sr_target=config.sr_target)
    assert all(term.item() > 0 for term in loss)
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    groups = model.param_groups(lr=0.01, encoder_lr_scale=0.1)
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(model.parameters()))
    assert {id(p) for p in model.sisr.predict.parameters()} <= {id(p) for p in in_groups}
    optimizer = torch.optim.SGD(groups, lr=0.01)
    before = model.sisr.predict.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.sisr.predict.weight)


def count_flops(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", ["dsrl", "dsrl_dup", "dsrl_res", "dsrl_bilinear"])
def test_inference_flops_equal_the_plain_network(variant):
    config = tiny(variant, output_stride=8)
    x = torch.rand(1, 3, 40, 56)
    inference = count_flops(create_model(config, inference=True), x)
    plain = count_flops(create_model(config.without_training_branches()).eval(), x)
    training = count_flops(create_model(config).eval(), x)
    assert inference == plain
    assert inference < training


def test_dsrl_bilinear_infers_with_exactly_the_baseline_network():
    x = torch.rand(1, 3, 40, 56)
    bilinear = create_model(tiny("dsrl_bilinear", output_stride=8), inference=True)
    baseline = create_model(tiny("baseline", output_stride=8), inference=True)
    shapes = {k: v.shape for k, v in bilinear.state_dict().items()}
    assert shapes == {k: v.shape for k, v in baseline.state_dict().items()}
    assert count_flops(bilinear, x) == count_flops(baseline, x)
    training = create_model(tiny("dsrl_bilinear", output_stride=8))
    out = training(x)
    # The FA loss compares the upsampled logits (through their feature transform) with the SR features.
    expected = training.feature_transform.seg(out.logits)
    torch.testing.assert_close(out.f_seg, expected)


@pytest.mark.parametrize("variant", ["dsrl", "dsrl_dup", "dsrl_res", "dsrl_bilinear", "baseline"])
def test_training_checkpoint_loads_into_the_inference_model(variant):
    torch.manual_seed(0)
    config = tiny(variant, output_stride=8)
    trained = create_model(config)
    trained(torch.rand(2, 3, 40, 56))  # move the BN running statistics away from their init
    trained.eval()
    full = trained.state_dict()
    inference = create_model(config, inference=True)
    own = inference.state_dict()
    assert set(own) <= set(full)
    assert all(own[k].shape == full[k].shape for k in own)
    stripped = strip_training_branches(full)
    assert set(stripped) == set(own)
    inference.load_state_dict(stripped, strict=True)
    x = torch.rand(1, 3, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x).logits)
    if config.sisr:
        assert len(full) > len(own)
