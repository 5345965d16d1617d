"""training.pretrained: torchvision ImageNet ResNet weights into the DSRL encoder and the refiner backbone.

torchvision is not installed: ``torchvision_resnet`` below writes out torchvision's ResNet naming
and shapes (conv1/bn1 stem, layer1..4 of basic blocks or bottlenecks, downsample shortcuts where
the stride or width changes, fc classifier) independently of the project's encoders.
"""
from __future__ import annotations

import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from engine.errors import FineMaskError
from engine.models import SegmenterConfig, create_model
from engine.models.cascadepsp import RefinementModule, RefinerConfig
from engine.models.encoders import ResNetEncoder
from training.pretrained import apply_pretrained_encoder, init_from_pretrained, load_torchvision_resnet
from training.tiny import TINY_SEGMENTER

LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
#: the tiny refiner with the official (bottleneck) backbone layout: stem 64, one block per stage
TINY_R50 = dict(stage_channels=(64, 128, 256, 512), stage_blocks=(1, 1, 1, 1), psp_channels=16,
                decoder_channels=(8, 8, 8), head_channels=8)


def torchvision_resnet(kind: str, counts, stem: int = 64, planes=(64, 128, 256, 512), *, seed: int = 0,
                       tracked: bool = True, classes: int = 10) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's ResNet names and shapes (``tracked``: with num_batches_tracked)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{t}"] = (c,)
        if tracked:
            shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", stem, 3, 7)
    bn("bn1", stem)
    expansion = 4 if kind == "bottleneck" else 1
    inplanes = stem
    for stage, (n, p) in enumerate(zip(counts, planes), 1):
        out = p * expansion
        for b in range(n):
            name, cin = f"layer{stage}.{b}", inplanes if b == 0 else out
            if kind == "bottleneck":
                conv(f"{name}.conv1", p, cin, 1), bn(f"{name}.bn1", p)
                conv(f"{name}.conv2", p, p, 3), bn(f"{name}.bn2", p)
                conv(f"{name}.conv3", out, p, 1), bn(f"{name}.bn3", out)
            else:
                conv(f"{name}.conv1", p, cin, 3), bn(f"{name}.bn1", p)
                conv(f"{name}.conv2", out, p, 3), bn(f"{name}.bn2", out)
            if b == 0 and (stage > 1 or cin != out):  # torchvision: stride 2, or a width change
                conv(f"{name}.downsample.0", out, cin, 1), bn(f"{name}.downsample.1", out)
        inplanes = out
    shapes["fc.weight"], shapes["fc.bias"] = (classes, inplanes), (classes,)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + len(state))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


def tiny_resnet(depth: int, **kw) -> dict[str, torch.Tensor]:
    """torchvision layout of ``depth`` at a quarter of the width (matches encoder_width=0.25)."""
    kind, counts = LAYOUTS[depth]
    return torchvision_resnet(kind, counts, 16, (16, 32, 64, 128), **kw)


def tiny_segmenter(encoder: str, output_stride: int = 16):
    return create_model(SegmenterConfig.for_variant("dsrl", 3, encoder=encoder, output_stride=output_stride,
                                                    **TINY_SEGMENTER))


def assert_landed(state, own, prefix=""):
    for key, value in state.items():
        if key.startswith("fc."):
            assert not any(k.endswith(key) for k in own)
            continue
        torch.testing.assert_close(own[prefix + key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("depth,output_stride,tracked", [(18, 16, True), (34, 8, False), (50, 8, True)])
def test_every_tensor_lands_in_the_dsrl_encoder(depth, output_stride, tracked):
    model = tiny_segmenter(f"resnet{depth}", output_stride)
    state = tiny_resnet(depth, tracked=tracked)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_pretrained_encoder(model, state, what="tv.pth")
    own = model.state_dict()
    assert report.tensors == len(state) - 2 and report.ignored == ["fc.bias", "fc.weight"]
    assert report.architecture.startswith(f"ResNet-{depth} ") and report.zero_input_channels == 0
    assert_landed(state, own, "encoder.")
    for key, value in own.items():  # nothing outside the encoder changed
        if not key.startswith("encoder."):
            assert torch.equal(value, before[key]), key
    if not tracked:  # the file's older layout has no counters: the model keeps its own
        assert own["encoder.bn1.num_batches_tracked"] == before["encoder.bn1.num_batches_tracked"]


def test_full_size_resnet50_matches_torchvision_layout_in_both_models():
    """The real ImageNet ResNet-50 table lands in a full-width encoder and the official refiner backbone."""
    state = torchvision_resnet(*LAYOUTS[50], classes=1000)
    encoder = ResNetEncoder(50, output_stride=8)
    report = apply_pretrained_encoder(encoder, state, what="resnet50.pth")
    assert report.tensors == len(state) - 2
    assert_landed(state, encoder.state_dict())

    refiner = RefinementModule(RefinerConfig(backbone="resnet50"))
    report = apply_pretrained_encoder(refiner, state, what="resnet50.pth")
    own = refiner.state_dict()
    assert report.zero_input_channels == 3 and report.tensors == len(state) - 2
    conv1 = own["feats.conv1.weight"]
    assert conv1.shape == (64, 6, 7, 7)
    assert torch.equal(conv1[:, :3], state["conv1.weight"]) and not conv1[:, 3:].any()
    assert_landed({k: v for k, v in state.items() if k != "conv1.weight"}, own, "feats.")


def _saved(tmp_path, state, name="w.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("depth,target,message", [
    (18, "resnet50", "holds ResNet-18 (basic blocks 2-2-2-2) weights, but the DSRL encoder (resnet50) is a ResNet-50"),
    (34, "resnet18", "holds ResNet-34 (basic blocks 3-4-6-3) weights, but the DSRL encoder (resnet18) is a ResNet-18"),
    (50, "resnet34", "holds ResNet-50 (bottleneck blocks 3-4-6-3) weights"),
])
def test_a_file_of_another_depth_is_refused_by_name(tmp_path, depth, target, message):
    path = _saved(tmp_path, tiny_resnet(depth))
    model = tiny_segmenter(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FineMaskError, match=re.escape(message)) as err:
        init_from_pretrained(model, path)
    assert str(path) in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-copied


@pytest.mark.parametrize("state,message", [
    ({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.1.weight": torch.zeros(10, 8)},
     "not a torchvision ResNet state dict .*features.0.weight"),
    ({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, "holds only a classifier"),
])
def test_a_file_that_is_not_a_resnet_is_refused(tmp_path, state, message):
    path = _saved(tmp_path, state)
    with pytest.raises(FineMaskError, match=message) as err:
        init_from_pretrained(tiny_segmenter("resnet18"), path)
    assert err.value.path == path


def test_wrong_width_missing_and_foreign_keys_are_refused(tmp_path):
    model = tiny_segmenter("resnet18")
    full_width = torchvision_resnet(*LAYOUTS[18])  # 64 channels; the tiny encoder has 16
    wrong = r"100 tensor shape\(s\) do not fit .*: conv1.weight \(64, 3, 7, 7\) in the file, \(16, 3, 7, 7\) in"
    with pytest.raises(FineMaskError, match=wrong):
        apply_pretrained_encoder(model, full_width, what="w.pth")
    state = tiny_resnet(18)
    del state["layer2.0.downsample.1.running_var"]
    with pytest.raises(FineMaskError, match="lacks 1 tensor.*layer2.0.downsample.1.running_var"):
        apply_pretrained_encoder(model, state, what="w.pth")
    prefixed = {f"module.{k}": v for k, v in tiny_resnet(18).items()}
    with pytest.raises(FineMaskError, match="not a torchvision ResNet"):
        apply_pretrained_encoder(model, prefixed, what="w.pth")
    extra = {**tiny_resnet(18), "head.weight": torch.zeros(3)}
    with pytest.raises(FineMaskError, match="not torchvision ResNet names: head.weight"):
        apply_pretrained_encoder(model, extra, what="w.pth")


def test_encoders_without_a_torchvision_counterpart_are_refused():
    with pytest.raises(FineMaskError, match="'light' has no torchvision ImageNet counterpart"):
        apply_pretrained_encoder(RefinementModule(RefinerConfig()), tiny_resnet(18), what="w.pth")
    with pytest.raises(FineMaskError, match="'mobile' has no torchvision"):
        apply_pretrained_encoder(tiny_segmenter("mobile"), tiny_resnet(18), what="w.pth")


def test_unreadable_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a pickle at all" * 10)
    with pytest.raises(FineMaskError, match="not a loadable PyTorch weights file") as err:
        load_torchvision_resnet(garbage)
    assert err.value.path == garbage
    with pytest.raises(FineMaskError, match="does not hold a state dict of tensors"):
        load_torchvision_resnet(_saved(tmp_path, [torch.zeros(2)], "list.pth"))
    with pytest.raises(FineMaskError, match="not found"):
        load_torchvision_resnet(tmp_path / "absent.pth")
    wrapped = _saved(tmp_path, {"state_dict": tiny_resnet(18)}, "wrapped.pth")
    assert torch.equal(load_torchvision_resnet(wrapped)["conv1.weight"], tiny_resnet(18)["conv1.weight"])


def test_a_name_resolves_through_the_installed_registry(tmp_path, monkeypatch):
    """NAME goes to ``engine.installed.weights_path`` (replaced here: it may not exist yet)."""
    path = _saved(tmp_path, tiny_resnet(34), "resnet34-imagenet.pth")
    asked = []

    def weights_path(name):
        asked.append(name)
        if name != "resnet34-imagenet":
            raise FineMaskError(f"{name!r} is not installed")
        return path

    monkeypatch.setitem(sys.modules, "engine.installed", types.SimpleNamespace(weights_path=weights_path))
    model = tiny_segmenter("resnet34")
    report = init_from_pretrained(model, "resnet34-imagenet")
    assert asked == ["resnet34-imagenet"] and report.source == str(path)
    assert_landed(tiny_resnet(34), model.state_dict(), "encoder.")
    with pytest.raises(FineMaskError, match="'resnet50-imagenet' is not installed"):
        init_from_pretrained(model, "resnet50-imagenet")


# --- through the CLI ----------------------------------------------------------------------------


def _folder_dataset(root):
    from engine.io import write_image, write_labels
    from training.data.readers import FolderDataset

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        labels = (rng.random((64, 64)) * 3).astype(np.uint8)
        write_image(root / "images" / f"{i}.png", (np.repeat(labels[..., None], 3, 2) * 100).astype(np.uint8))
        write_labels(root / "labels" / f"{i}.png", labels)
    return FolderDataset(root, ["a", "b", "c"])


def _spy_on_train_loop(monkeypatch, module, prefix):
    """Record the model's ``prefix`` tensors as train_loop receives it (the step-0 weights)."""
    seen = []
    real = module.train_loop

    def spy(model, *args, **kwargs):
        seen.append({k[len(prefix):]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, "train_loop", spy)
    return seen


def test_cli_dsrl_starts_from_the_file_and_resume_does_not_reload_it(tmp_path, monkeypatch):
    from app.cli import main
    from training import train_dsrl as module
    from training.resume import load_state

    dataset = _folder_dataset(tmp_path / "data")
    monkeypatch.setattr(module, "load_dataset", lambda name, split: dataset)

    class TinyConfig(SegmenterConfig):
        @classmethod
        def for_variant(cls, name, num_classes, **kw):
            return SegmenterConfig.for_variant(name, num_classes, **{**kw, **TINY_SEGMENTER})

    monkeypatch.setattr(module, "SegmenterConfig", TinyConfig)
    seen = _spy_on_train_loop(monkeypatch, module, "encoder.")
    state = tiny_resnet(18)
    path = _saved(tmp_path, state, "imagenet18.pth")
    run = tmp_path / "run"
    args = ["train", "dsrl", "--encoder", "resnet18", "--crop", "64", "64", "--batch-size", "2",
            "--ckpt-every", "100", "--run", str(run)]
    assert main([*args, "--steps", "2", "--pretrained", str(path)]) == 0
    assert_landed(state, seen[0])  # step 0: the file's weights
    trained = load_state(run / "state")["model"]
    assert not torch.equal(trained["encoder.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert json.loads((run / "train_config.json").read_text())["pretrained"] == str(path)

    path.unlink()  # a resumed run takes its weights from the checkpoint and keeps the record
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert not torch.equal(seen[1]["conv1.weight"], state["conv1.weight"])  # not applied again
    assert json.loads((run / "train_config.json").read_text())["pretrained"] == str(path)

    # clear errors (exit 2), before any training: a missing file, an encoder with no ImageNet counterpart
    assert main([*args, "--steps", "1", "--pretrained", str(path), "--run", str(tmp_path / "r2")]) == 2
    path.parent.joinpath("again.pth").write_bytes(b"")
    mobile = ["train", "dsrl", "--encoder", "mobile", "--steps", "1", "--run", str(tmp_path / "r3"),
              "--pretrained", str(tmp_path / "again.pth")]
    assert main(mobile) == 2 and not (tmp_path / "r3").exists()


class Disks(Dataset):
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 4

    def __getitem__(self, key):
        rng = np.random.default_rng([self.epoch, key])
        yy, xx = np.mgrid[:32, :32]
        gt = ((yy - rng.uniform(10, 22)) ** 2 + (xx - 16) ** 2 < 36).astype(np.float32)
        coarse = np.roll(gt, 2, axis=1)
        image = np.repeat((0.2 + 0.6 * gt)[None], 3, 0).astype(np.float32)
        return torch.from_numpy(image), torch.from_numpy(gt[None]), torch.from_numpy(coarse[None])


def test_cli_refine_starts_from_the_file_and_the_card_records_it(tmp_path, monkeypatch):
    from app.cli import main
    from engine.checkpoints import load_checkpoint
    from training import train_refine as module

    monkeypatch.setattr(module, "build_refine_crops", lambda sources, length, config: Disks())
    tiny = lambda **kw: RefinerConfig(**kw, **TINY_R50)  # noqa: E731 - for the trainer and the export
    monkeypatch.setattr(module, "RefinerConfig", tiny)
    monkeypatch.setattr("engine.models.cascadepsp.RefinerConfig", tiny)
    seen = _spy_on_train_loop(monkeypatch, module, "feats.")
    state = torchvision_resnet("bottleneck", (1, 1, 1, 1), 64, (16, 32, 64, 128))
    path = _saved(tmp_path, state, "r50.pth")
    run = tmp_path / "run"
    args = ["train", "refine", "--backbone", "resnet50", "--steps", "1", "--batch-size", "2", "--run", str(run),
            "--pretrained", str(path)]
    assert main(args) == 0
    conv1 = seen[0].pop("conv1.weight")
    assert torch.equal(conv1[:, :3], state.pop("conv1.weight")) and not conv1[:, 3:].any()
    assert_landed(state, seen[0])
    assert main(["train", "export", str(run), "--to", str(tmp_path / "m"), "--name", "r"]) == 0
    _, card = load_checkpoint(tmp_path / "m")
    assert card.training["pretrained"] == str(path)
    # the light backbone has no ImageNet counterpart: a clear error (exit 2), not a traceback
    light = ["train", "refine", "--backbone", "light", "--steps", "1", "--run", str(tmp_path / "r2"),
             "--pretrained", str(path)]
    assert main(light) == 2


def test_a_name_installed_with_finemask_models_add_loads(tmp_path, monkeypatch):
    """End to end with the real registry: ``finemask models add FILE --name my-r18``, then that name."""
    installed = pytest.importorskip("engine.installed")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    state = torchvision_resnet(*LAYOUTS[18], classes=1000)
    installed.add(_saved(tmp_path, state, "resnet18-custom.pth"), name="my-r18")
    encoder = ResNetEncoder(18)
    report = init_from_pretrained(encoder, "my-r18")
    assert report.tensors == len(state) - 2
    assert_landed(state, encoder.state_dict())
    with pytest.raises(FineMaskError, match="'resnet50-imagenet' are not installed"):
        init_from_pretrained(ResNetEncoder(50), "resnet50-imagenet")
