"""Reading a PyTorch weights file and telling what it is (CascadePSP refiner or ResNet encoder)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FineMaskError


def load_state_dict(path: Path) -> dict[str, Any]:
    """A state dict of tensors from a pickled weights file (``engine.checkpoints``' one reader)."""
    from ..checkpoints import read_pickled_state_dict

    return read_pickled_state_dict(path)


def detect_kind(state: Mapping[str, Any], path: Path) -> tuple[str, str]:
    """("refinement", "cascadepsp") or ("encoder", "resnet18/34/50") from the parameter names."""
    keys = set(state)
    if any(k.startswith("feats.") for k in keys) and any(k.startswith("psp.") for k in keys):
        return "refinement", "cascadepsp"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        blocks = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
        bottleneck = "layer1.0.conv3.weight" in keys
        depth = {(False, 2): 18, (False, 6): 34, (True, 6): 50}.get((bottleneck, len(blocks)))
        if depth is None:
            raise FineMaskError(f"a ResNet state dict, but not ResNet-18, -34 or -50 ({len(blocks)} blocks in "
                                "layer3); FineMask's encoders are those three", path)
        return "encoder", f"resnet{depth}"
    raise FineMaskError("neither the official CascadePSP weights, a torchvision ResNet-18/34/50 state dict, "
                        "nor a FineMask model folder", path)


def encoder_state(state: Mapping[str, Any], depth: int, path: Path) -> dict[str, Any]:
    """The encoder's tensors of a torchvision ResNet state dict (``fc`` dropped), shapes checked."""
    import torch

    from ..models.encoders import ResNetEncoder

    with torch.device("meta"):
        expected = ResNetEncoder(depth).state_dict()
    out: dict[str, Any] = {}
    for key, ref in expected.items():
        value = state.get(key)
        if value is None and key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)  # older files leave the counters out
        if value is None:
            raise FineMaskError(f"ResNet-{depth} state dict lacks {key}", path)
        if tuple(value.shape) != tuple(ref.shape):
            raise FineMaskError(f"{key} has shape {tuple(value.shape)}, ResNet-{depth} needs {tuple(ref.shape)}",
                                path)
        out[key] = value.to(ref.dtype) if value.is_floating_point() else value
    extra = sorted(k for k in state if k not in expected and not k.startswith("fc."))
    if extra:
        raise FineMaskError(f"not a plain ResNet-{depth} state dict (unexpected {', '.join(extra[:5])})", path)
    return out
