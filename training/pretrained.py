"""Start training from ImageNet-pretrained ResNet weights in torchvision's layout.

``finemask train dsrl|refine --pretrained NAME|FILE``: NAME is an installed weights file
(``finemask models get resnet50-imagenet``, resolved by ``engine.installed.weights_path``), FILE a
torchvision ResNet state dict (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ...,
``fc.*``). The weights go into the DSRL segmenter's ResNet encoder or the refinement module's
ResNet-50 backbone; the classifier (``fc.*``) is left out.

Both encoders use torchvision's parameter names by design, and the mapping below is written out
from each module's structure (stem, then every block's convs, BatchNorms and shortcut), not from
the order of the state dict. Dilation and output stride do not change any weight shape. Every
tensor of the encoder must come from the file with the same shape, and every ResNet tensor of the
file must land; anything else (another depth, another width, a file that is not a ResNet) is one
:class:`~engine.errors.FineMaskError` naming the file.

The refinement module's first conv reads 6 channels (RGB + the mask and two earlier
estimates). As in CascadePSP's ``load_weights_sequential``, its RGB filters take the ImageNet
ones and the extra input channels start at zero: the pretrained features are unchanged at step 0
and the mask filters grow from the gradient (which is non-zero for zero weights).
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoints import read_pickled_state_dict
from engine.errors import FineMaskError

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: Optional in a file: torchvision's older ImageNet releases predate this BatchNorm buffer.
_OPTIONAL = "num_batches_tracked"
_RESNET_KEY = re.compile(r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.\w+(\.\d+)?\.\w+)$")
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
#: (block kind, blocks per stage) -> torchvision's name for it
_KNOWN_DEPTHS = {
    ("basic", (2, 2, 2, 2)): "ResNet-18",
    ("basic", (3, 4, 6, 3)): "ResNet-34",
    ("bottleneck", (3, 4, 6, 3)): "ResNet-50",
    ("bottleneck", (3, 4, 23, 3)): "ResNet-101",
    ("bottleneck", (3, 8, 36, 3)): "ResNet-152",
}


@dataclass
class PretrainedReport:
    """What :func:`apply_pretrained_encoder` did.

    ``tensors``: tensors copied from the file into the model; ``ignored``: file keys left out
    (the ImageNet classifier); ``zero_input_channels``: input channels of the first conv beyond
    RGB that were set to zero (3 for the refinement module, 0 for the segmenter).
    """

    source: str
    target: str
    architecture: str
    tensors: int
    ignored: list[str] = field(default_factory=list)
    zero_input_channels: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- loading


def resolve_pretrained(name_or_file: str | Path) -> Path:
    """The weights file of ``name_or_file``: an existing file, else an installed model name."""
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise FineMaskError("is a folder, not a weights file", path)
    text = str(name_or_file)
    if path.suffix or "/" in text or "\\" in text:
        raise FineMaskError("pretrained weights file not found", path)
    try:  # imported here: the installed-model registry is optional for this module
        installed = importlib.import_module("engine.installed")
    except ModuleNotFoundError as exc:
        if exc.name != "engine.installed":
            raise
        raise FineMaskError(f"{text!r} is neither a file nor an installed model name") from None
    return Path(installed.weights_path(text))


def load_torchvision_resnet(name_or_file: str | Path) -> dict[str, torch.Tensor]:
    """Read a torchvision-layout state dict (a NAME from ``finemask models get``, or a FILE).

    Read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper is removed.
    Raises FineMaskError naming the file when it cannot be read or holds no tensors.
    """
    path = resolve_pretrained(name_or_file)
    # foreign keys such as DataParallel's ``module.`` are reported by the mapping, not dropped here
    return read_pickled_state_dict(path, strip_module=False)


# ------------------------------------------------------------------------------------- mapping


def torchvision_key_map(encoder: nn.Module) -> dict[str, str]:
    """torchvision key -> ``encoder`` state-dict key, written out from the encoder's structure.

    ``encoder`` is a ResNet with a ``conv1``/``bn1`` stem and ``layer1..4`` of basic blocks
    (``conv1``, ``conv2``) or bottlenecks (``+ conv3``), each with ``bn<i>`` after ``conv<i>``
    and an optional ``downsample`` = (1x1 conv, BatchNorm) shortcut. BatchNorm entries include
    ``num_batches_tracked``.
    """
    mapping: dict[str, str] = {}

    def conv(tv: str, ours: str) -> None:
        mapping[f"{tv}.weight"] = f"{ours}.weight"

    def bn(tv: str, ours: str) -> None:
        for name in _BN_TENSORS:
            mapping[f"{tv}.{name}"] = f"{ours}.{name}"

    conv("conv1", "conv1")
    bn("bn1", "bn1")
    for stage in range(1, 5):
        for i, block in enumerate(getattr(encoder, f"layer{stage}")):
            tv = ours = f"layer{stage}.{i}"
            for n in (1, 2, 3) if hasattr(block, "conv3") else (1, 2):
                conv(f"{tv}.conv{n}", f"{ours}.conv{n}")
                bn(f"{tv}.bn{n}", f"{ours}.bn{n}")
            if block.downsample is not None:
                conv(f"{tv}.downsample.0", f"{ours}.downsample.0")
                bn(f"{tv}.downsample.1", f"{ours}.downsample.1")
    own = set(encoder.state_dict())
    if set(mapping.values()) != own:  # the encoder changed shape: this module must learn it
        stray = sorted(own ^ set(mapping.values()))
        raise RuntimeError(f"torchvision mapping does not cover the encoder: {stray[:5]}")
    return mapping


def describe_resnet(keys) -> str:
    """``"ResNet-50"`` or, for an unusual layout, ``"ResNet (basic blocks 1-1-1-1)"``."""
    counts = [0, 0, 0, 0]
    for key in keys:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, index = int(m.group(1)), int(m.group(2))
            counts[stage - 1] = max(counts[stage - 1], index + 1)
    kind = "bottleneck" if any(re.match(r"^layer[1-4]\.\d+\.conv3\.", k) for k in keys) else "basic"
    layout = (kind, tuple(counts))
    text = f"{kind} blocks {'-'.join(map(str, counts))}"
    return f"{_KNOWN_DEPTHS[layout]} ({text})" if layout in _KNOWN_DEPTHS else f"ResNet ({text})"


def _encoder_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The ResNet of ``model`` that takes ImageNet weights, and its name for messages."""
    from engine.models.cascadepsp import DilatedResNet, RefinementModule
    from engine.models.dsrl import DSRL
    from engine.models.encoders import ResNetEncoder

    if isinstance(model, DSRL):
        if not isinstance(model.encoder, ResNetEncoder):
            raise FineMaskError(
                f"the DSRL encoder {model.config.encoder!r} has no torchvision ImageNet counterpart; "
                "--pretrained needs --encoder resnet18, resnet34 or resnet50"
            )
        return model.encoder, f"DSRL encoder ({model.config.encoder})"
    if isinstance(model, RefinementModule):
        if model.config.backbone != "resnet50":
            raise FineMaskError(
                f"the refinement backbone {model.config.backbone!r} has no torchvision ImageNet "
                "counterpart; --pretrained needs --backbone resnet50"
            )
        return model.feats, "refinement backbone (resnet50)"
    if isinstance(model, (ResNetEncoder, DilatedResNet)):
        return model, type(model).__name__
    raise FineMaskError(f"ImageNet ResNet weights do not apply to a {type(model).__name__}")


def check_pretrained_target(model: nn.Module) -> None:
    """Raise FineMaskError unless ``model`` has a ResNet that takes ImageNet weights."""
    _encoder_of(model)


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_pretrained_encoder(model: nn.Module, state: dict[str, torch.Tensor], *,
                             what: str | Path) -> PretrainedReport:
    """Copy a torchvision ResNet state dict into ``model``'s encoder; ``what`` names the file.

    ``model``: a DSRL segmenter with a ResNet encoder, a refinement module with the ResNet-50
    backbone, or a bare ``ResNetEncoder``/``DilatedResNet``. Every encoder tensor is replaced
    (``num_batches_tracked`` only where the file has it); ``fc.*`` is ignored. A first conv with
    more input channels than the file's 3 gets the RGB filters and zeros for the rest.
    """
    encoder, target = _encoder_of(model)
    mapping = torchvision_key_map(encoder)
    resnet = sorted(k for k in state if _RESNET_KEY.match(k))
    ignored = sorted(k for k in state if k.startswith("fc."))
    other = sorted(set(state) - set(resnet) - set(ignored))
    file_arch, our_arch = describe_resnet(resnet), describe_resnet(mapping)

    if not resnet:
        if ignored and not other:
            raise FineMaskError("holds only a classifier (fc.*), no ResNet encoder weights", what)
        raise FineMaskError(f"not a torchvision ResNet state dict (no conv1/bn1/layer1-4 tensors; "
                            f"keys such as {_listing(other, 3)})", what)
    if other:
        raise FineMaskError(f"has keys that are not torchvision ResNet names: {_listing(other)}", what)
    if file_arch != our_arch:
        raise FineMaskError(f"holds {file_arch} weights, but the {target} is a {our_arch}", what)
    missing = sorted(k for k in mapping if k not in state and not k.endswith(_OPTIONAL))
    if missing:
        raise FineMaskError(f"lacks {len(missing)} tensor(s) of the {target}: {_listing(missing)}", what)
    unknown = sorted(k for k in resnet if k not in mapping)
    if unknown:
        raise FineMaskError(f"has tensors the {target} does not: {_listing(unknown)}", what)

    own = encoder.state_dict()
    present = [tv for tv in mapping if tv in state]  # the encoder's order: stem first
    wrong, zero_channels = [], 0
    for tv in present:
        src, dst = state[tv], own[mapping[tv]]
        if tv == "conv1.weight" and src.dim() == 4 and src.shape[1] == 3 and dst.shape[1] > 3 \
                and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
            zero_channels = dst.shape[1] - 3  # image + mask input (refinement module)
            continue
        if src.shape != dst.shape:
            wrong.append(f"{tv} {tuple(src.shape)} in the file, {tuple(dst.shape)} in the model")
    if wrong:
        raise FineMaskError(f"{len(wrong)} tensor shape(s) do not fit the {target} (another width?): "
                            f"{_listing(wrong, 2)}", what)

    with torch.no_grad():
        for tv in present:
            dst = own[mapping[tv]]
            if tv == "conv1.weight" and zero_channels:
                dst[:, :3].copy_(state[tv])
                dst[:, 3:].zero_()
            else:
                dst.copy_(state[tv])
    return PretrainedReport(source=str(what), target=target, architecture=file_arch, tensors=len(present),
                            ignored=ignored, zero_input_channels=zero_channels)


def init_from_pretrained(model: nn.Module, name_or_file: str | Path) -> PretrainedReport:
    """Check that ``model`` takes ImageNet weights, read ``name_or_file`` and apply it."""
    check_pretrained_target(model)
    path = resolve_pretrained(name_or_file)
    return apply_pretrained_encoder(model, load_torchvision_resnet(path), what=path)


# ------------------------------------------------------------------------------ training runs


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether ``train_loop(resume=True)`` will load a checkpoint (its own test, repeated)."""
    state = run_dir / "state"
    return state.exists() or state.with_name(".state.old").exists()


def start_run_from(model: nn.Module, pretrained: str | None, run_dir: str | Path, resume: bool) -> str | None:
    """Apply ``pretrained`` when a run starts fresh; return what the run config records.

    A resumed run (``resume`` and a checkpoint in ``run_dir``) keeps its checkpoint's weights and
    the ``pretrained`` value its ``train_config.json`` recorded when it started.
    """
    run_dir = Path(run_dir)
    if resume and _has_checkpoint(run_dir):
        config = run_dir / "train_config.json"
        return json.loads(config.read_text()).get("pretrained") if config.is_file() else pretrained
    if pretrained:
        init_from_pretrained(model, pretrained)
    return pretrained or None


__all__ = ["PretrainedReport", "apply_pretrained_encoder", "check_pretrained_target", "describe_resnet",
           "init_from_pretrained", "load_torchvision_resnet", "resolve_pretrained", "start_run_from",
           "torchvision_key_map"]
