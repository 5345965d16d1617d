"""The CascadePSP refinement module: official state-dict layout, cascade wiring, output stride."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import FineMaskError
from engine.models.cascadepsp import (
    OUTPUT_NAMES,
    RefinementModule,
    RefinerConfig,
    fuse_for_inference,
)
from engine.refine import Refiner

TINY = RefinerConfig(backbone="light", stage_channels=(8, 16, 16, 24), psp_channels=16,
                     decoder_channels=(8, 8, 4), head_channels=8)

# Parameter names and shapes of the official CascadePSP checkpoint (hkchengrex/CascadePSP,
# models/psp/pspnet.py + extractors.py, DataParallel prefix removed), written out by hand.
OFFICIAL_SAMPLES = {
    "feats.conv1.weight": (64, 6, 7, 7),
    "feats.bn1.running_var": (64,),
    "feats.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "feats.layer2.3.conv3.weight": (512, 128, 1, 1),
    "feats.layer3.0.downsample.1.weight": (1024,),
    "feats.layer3.5.conv2.weight": (256, 256, 3, 3),
    "feats.layer4.2.bn3.bias": (2048,),
    "psp.stages.0.1.weight": (2048, 2048, 1, 1),
    "psp.stages.3.1.weight": (2048, 2048, 1, 1),
    "psp.bottleneck.weight": (1024, 10240, 1, 1),
    "psp.bottleneck.bias": (1024,),
    "up_1.conv.0.weight": (1280,),
    "up_1.conv.2.weight": (512, 1280, 3, 3),
    "up_1.conv.3.running_mean": (512,),
    "up_1.conv.5.weight": (512, 512, 3, 3),
    "up_1.conv2.0.weight": (512,),
    "up_1.shortcut.weight": (512, 1024, 1, 1),
    "up_2.conv.2.weight": (256, 576, 3, 3),
    "up_2.shortcut.bias": (256,),
    "up_3.conv.2.weight": (32, 259, 3, 3),
    "up_3.conv2.5.weight": (32, 32, 3, 3),
    "final_28.0.weight": (32, 1024, 1, 1),
    "final_28.2.weight": (1, 32, 1, 1),
    "final_56.0.weight": (32, 512, 1, 1),
    "final_11.weight": (32, 35, 1, 1),
    "final_21.weight": (1, 32, 1, 1),
}


class _Evil:
    """Unpickling this would call a function: weights-only loading must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.fixture(scope="module")
def resnet50() -> RefinementModule:
    torch.manual_seed(0)
    return RefinementModule(RefinerConfig(backbone="resnet50")).eval()


def _official_state(model: RefinementModule, with_counters: bool = True) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict in the official file's layout (``module.`` prefix)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            if with_counters:
                out["module." + k] = torch.tensor(45000)
            continue
        if k.endswith("running_var"):
            t = torch.rand(v.shape, generator=g) + 0.5
        else:
            t = torch.randn(v.shape, generator=g) * 0.02
        out["module." + k] = t
    return out


def test_resnet50_matches_official_key_names_and_shapes(resnet50):
    sd = resnet50.state_dict()
    params = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for key, shape in OFFICIAL_SAMPLES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # ResNet-50: 3, 4, 6, 3 bottlenecks; 53 BN layers in the backbone + 8 in the decoder.
    blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in sd if k.startswith("feats.layer")}
    assert sorted(blocks) == sorted(f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n))
    assert len([k for k in sd if k.endswith("running_mean")]) == 53 + 12
    assert len(params) == 426 - 65  # 426 entries in all, 65 of them BN step counters
    assert sum(v.numel() for k, v in resnet50.named_parameters()) > 60_000_000


def test_resnet50_dilation_follows_reference(resnet50):
    # The reference dilates every block of layer3/layer4 except the first one.
    f = resnet50.feats
    assert f.layer3[0].conv2.dilation == (1, 1) and f.layer3[1].conv2.dilation == (2, 2)
    assert f.layer4[0].conv2.dilation == (1, 1) and f.layer4[2].conv2.dilation == (4, 4)
    assert f.layer2[0].conv2.stride == (2, 2) and f.layer3[0].conv2.stride == (1, 1)


def test_official_checkpoint_loads_converts_and_reloads(resnet50, tmp_path):
    state = _official_state(resnet50)
    pth = tmp_path / "model"
    torch.save(state, pth)
    ckpt = tmp_path / "converted"
    ref = Refiner.from_official_checkpoint(pth, save_to=ckpt, device="cpu")
    loaded = ref.model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k[len("module."):]], v), k
    assert (ckpt / "model.safetensors").is_file()
    card = json.loads((ckpt / "card.json").read_text())
    assert card["architecture"] == "cascadepsp" and card["config"]["backbone"] == "resnet50"
    again = Refiner.from_pretrained(ckpt, device="cpu")
    x = torch.randn(1, 3, 32, 48)
    s = torch.rand(1, 1, 32, 48) * 2 - 1
    with torch.inference_mode():
        a, b = ref.model(x, s)["pass3_os1"], again.model(x, s)["pass3_os1"]
    assert torch.equal(a, b)


def test_official_checkpoint_without_counters_or_prefix_loads(resnet50, tmp_path):
    state = {k[len("module."):]: v for k, v in _official_state(resnet50, with_counters=False).items()}
    torch.save(state, tmp_path / "m.pth")
    ref = Refiner.from_official_checkpoint(tmp_path / "m.pth", device="cpu")
    assert torch.equal(ref.model.state_dict()["psp.bottleneck.bias"], state["psp.bottleneck.bias"])


def test_official_checkpoint_errors_name_the_file(resnet50, tmp_path):
    state = _official_state(resnet50)
    state["module.extra.weight"] = torch.zeros(1)
    del state["module.final_21.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(FineMaskError, match="bad.pth.*missing.*final_21.bias.*unexpected.*extra.weight"):
        Refiner.from_official_checkpoint(tmp_path / "bad.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(FineMaskError, match="evil.pth"):
        Refiner.from_official_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(FineMaskError, match="not found"):
        Refiner.from_official_checkpoint(tmp_path / "absent.pth")


def _conv1_inputs(model: RefinementModule, *args) -> tuple[dict, list[torch.Tensor]]:
    seen: list[torch.Tensor] = []

    def hook(module, inputs):
        seen.append(inputs[0].clone())

    h = model.feats.conv1.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            out = model(*args)
    finally:
        h.remove()
    return out, seen


def test_cascade_feeds_each_pass_the_previous_outputs():
    torch.manual_seed(0)
    model = RefinementModule(TINY).eval()
    x = torch.randn(2, 3, 40, 56)
    seg = (torch.rand(2, 1, 40, 56) > 0.5).float() * 2 - 1
    out, seen = _conv1_inputs(model, x, seg)
    assert set(out) == set(OUTPUT_NAMES)
    assert all(v.shape == (2, 1, 40, 56) for v in out.values())
    assert len(seen) == 3
    p1, p2, p3 = seen
    assert torch.equal(p1[:, :3], x) and all(torch.equal(p1[:, c:c + 1], seg) for c in (3, 4, 5))
    t8 = torch.tanh(out["pass1_os8"])
    assert torch.equal(p2[:, 3:4], seg) and torch.allclose(p2[:, 4:5], t8) and torch.allclose(p2[:, 5:6], t8)
    assert torch.allclose(p3[:, 4:5], torch.tanh(out["pass2_os8"]))
    assert torch.allclose(p3[:, 5:6], torch.tanh(out["pass2_os4"]))
    # The local step's entry (prev_os8 given) runs passes 2 and 3 only and agrees with the full run.
    local, seen = _conv1_inputs(model, x, seg, t8)
    assert len(seen) == 2 and "pass1_os8" not in local
    assert torch.allclose(local["pass3_os1"], out["pass3_os1"], atol=1e-5)
    only3, seen = _conv1_inputs(model, x, seg, t8, torch.tanh(out["pass2_os4"]))
    assert len(seen) == 1 and set(only3) == {"pass3_os8", "pass3_os4", "pass3_os1"}


@pytest.mark.parametrize("config", [TINY, RefinerConfig(backbone="light")])
def test_backbone_output_stride_is_8(config):
    model = RefinementModule(config).eval()
    shapes = {}

    def record(name, index):
        def hook(module, inputs):
            shapes.setdefault(name, inputs[index].shape)
        return hook

    model.psp.register_forward_pre_hook(record("os8", 0))
    model.up_1.register_forward_pre_hook(record("os4", 1))
    model.up_2.register_forward_pre_hook(record("os2", 1))
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 96), torch.zeros(1, 1, 64, 96))
    assert shapes["os8"][-2:] == (8, 12) and shapes["os4"][-2:] == (16, 24) and shapes["os2"][-2:] == (32, 48)


def test_config_round_trips_through_json_and_rejects_unknown_backbone():
    cfg = TINY.resolved()
    back = RefinerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert RefinementModule(back).state_dict().keys() == RefinementModule(cfg).state_dict().keys()
    with pytest.raises(ValueError, match="backbone"):
        RefinementModule(RefinerConfig(backbone="vgg"))
    light = RefinerConfig(backbone="light").resolved()
    assert light.stage_channels == (32, 64, 96, 128)


def test_mask_skip_gives_the_os1_stage_the_full_resolution_mask():
    torch.manual_seed(0)
    skip = RefinementModule(replace(TINY, mask_skip=True)).eval()
    plain = RefinementModule(TINY).eval()
    assert skip.final_11.in_channels == plain.final_11.in_channels + 1
    # A card written before the option existed builds the model without it.
    assert RefinerConfig.from_dict({k: v for k, v in TINY.to_dict().items() if k != "mask_skip"}) == TINY
    x, seg = torch.randn(1, 3, 48, 64), torch.rand(1, 1, 48, 64) * 2 - 1
    t8, t4 = torch.rand(1, 1, 48, 64) * 2 - 1, torch.rand(1, 1, 48, 64) * 2 - 1
    seen = []
    h = skip.up_3.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[1]))
    with torch.inference_mode():
        skip(x, seg, t8, t4)
    h.remove()
    assert torch.equal(seen[0], torch.cat([x, seg], 1))


def test_light_model_is_much_smaller_than_resnet50(resnet50):
    light = RefinementModule(RefinerConfig(backbone="light"))
    n_light = sum(p.numel() for p in light.parameters())
    n_big = sum(p.numel() for p in resnet50.parameters())
    assert n_light * 20 < n_big
    assert np.isfinite(n_light)


def _randomise_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_pyramid_pooling_equals_the_reference_order_of_operations():
    torch.manual_seed(0)
    model = RefinementModule(TINY).eval()
    psp = model.psp
    x = torch.randn(2, 24, 13, 17)
    with torch.inference_mode():
        priors = [F.interpolate(stage(x), size=(13, 17), mode="bilinear", align_corners=False) for stage in psp.stages]
        expect = torch.relu(psp.bottleneck(torch.cat(priors + [x], 1)))
        torch.testing.assert_close(psp(x), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_skip", [False, True])
def test_decoder_fast_path_and_bn_folding_preserve_outputs(mask_skip):
    torch.manual_seed(0)
    model = RefinementModule(replace(TINY, mask_skip=mask_skip)).eval()
    _randomise_bn(model)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.feats.layer2.modules())
    x, s = torch.randn(1, 3, 48, 64), torch.rand(1, 1, 48, 64) * 2 - 1
    with torch.inference_mode():
        fast = model(x, s)
        fast_fused = fused(x, s)
        for stage in (model.up_1, model.up_2, model.up_3):
            stage.fast_eval = False
        plain = model(x, s)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast_fused[name], plain[name], atol=1e-4, rtol=1e-4)
    # the original keeps the official layout
    assert "feats.layer1.0.bn1.running_var" in model.state_dict()
