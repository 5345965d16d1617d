"""Refinement checkpoints: FineMask folders, the official CascadePSP weights, strict state loading."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoints import ModelCard, load_checkpoint, read_pickled_state_dict, save_checkpoint
from ..errors import FineMaskError
from ..models.cascadepsp import RefinementModule, RefinerConfig, build_refinement_module

ARCHITECTURE = "cascadepsp"


def load_module(name_or_path: str | Path) -> tuple[RefinementModule, ModelCard]:
    """The refinement module of a FineMask checkpoint (a shipped or installed name, or a folder)."""
    state, card = load_checkpoint(name_or_path)
    path = Path(str(name_or_path))
    if card.architecture != ARCHITECTURE:
        raise FineMaskError(f"this model is a {card.architecture!r} model, not a refinement "
                            f"({ARCHITECTURE!r}) model", path)
    # Build on the meta device first: a config that cannot be built, or tensors that do not
    # fit it, are refused before any memory is allocated for the module.
    try:
        with torch.device("meta"):
            probe = build_refinement_module(card.config)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted config is the card's problem
        raise FineMaskError(f"model card has an unusable config ({exc})", path) from None
    check_state(probe.state_dict(), state, path)
    model = build_refinement_module(card.config)
    load_state(model, state, path)
    return model, card


def load_official(path: str | Path, *, save_to: str | Path | None = None, name: str = "cascadepsp-official",
                  overwrite: bool = False) -> tuple[RefinementModule, ModelCard]:
    """The official CascadePSP weights (the ``model`` file of its release) as a module and card.

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but tensors
    and containers. ``module.`` prefixes (DataParallel) are removed. With ``save_to``, the weights
    are also written as a FineMask checkpoint folder (safetensors + card).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineMaskError("official CascadePSP checkpoint not found", path)
    state = read_pickled_state_dict(path)
    config = RefinerConfig(backbone="resnet50")
    model = RefinementModule(config)
    load_state(model, state, path)
    card = ModelCard(name=name, task="refinement", architecture=ARCHITECTURE, config=config.to_dict(),
                     training={"source": "official CascadePSP release weights (hkchengrex/CascadePSP)",
                               "file": path.name})
    if save_to is not None:
        save_checkpoint(save_to, model.state_dict(), card, overwrite=overwrite)
    return model, card


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with plain-words errors; BatchNorm step counters may be absent."""
    own = model.state_dict()
    check_state(own, state, path)
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``FineMaskError`` unless ``state`` has the keys and shapes of ``own``."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise FineMaskError("weights do not fit the refinement module: " + "; ".join(parts), path)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise FineMaskError(f"weights have wrong shapes: {'; '.join(wrong[:3])}", path)
