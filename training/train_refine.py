"""Train the CascadePSP refinement module on 224x224 crops with perturbed masks.

``finemask train refine --backbone light --run runs/refine-light --steps 45000``; ``--resume``
continues exactly. The loss supervises all six cascade outputs (``training.refine_losses``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.atomic import atomic_write_text
from engine.checkpoints import ModelCard, save_checkpoint
from engine.models.cascadepsp import RefinerConfig, build_refinement_module, normalise_image
from training.data.refine_crops import REFINE_SOURCES, RefineCropConfig, RefineCrops, build_refine_crops
from training.loop import EpochKeyed, LoopConfig, LoopResult, ProgressFn, _is_main, train_loop
from training.pretrained import start_run_from
from training.refine_losses import refinement_loss

REFINE_DATA_TERMS = (
    "binary class masks of CamVid (CC BY-NC 4.0), Dubai aerial (CC0), ISBI 2012 (challenge data), IDRiD "
    "(CC BY 4.0, Porwal et al. 2018) and alphamatting.com mattes (research use, Rhemann et al. 2009) "
    "composited over public-domain photos"
)


@dataclass
class RefineTrainConfig:
    backbone: str = "light"
    sources: tuple[str, ...] = REFINE_SOURCES
    crops_per_epoch: int = 10000
    lowres_prob: float = 0.0  #: share of low-resolution coarse masks (``RefineCropConfig.lowres_prob``)
    model: dict[str, Any] = field(default_factory=dict)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=45000, batch_size=12, lr=2.25e-4,
                                                                 schedule="step"))
    command: str = ""
    pretrained: str | None = None  #: ImageNet ResNet-50 weights (name or file) the backbone started from


def refine_loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cascade loss of one batch of (image [0, 1], gt {0, 1}, coarse {0, 1}) crops."""
    image, gt, coarse = batch
    outputs = net(normalise_image(image), coarse * 2 - 1)
    total, parts = refinement_loss(outputs, gt)
    return total, {"loss_os1_grad": parts["pass3_os1/grad"].item()} if "pass3_os1/grad" in parts else {}


def train_refine(
    cfg: RefineTrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    crops: RefineCrops | None = None,
    on_progress: ProgressFn | None = None,
    cancel=None,
) -> tuple[torch.nn.Module, LoopResult]:
    """Train in ``run_dir`` (state, log.csv, loss.png, train_config.json)."""
    model = build_refinement_module(RefinerConfig(backbone=cfg.backbone, **cfg.model))
    cfg = replace(cfg, pretrained=start_run_from(model, cfg.pretrained, run_dir, resume))
    if crops is None:
        crops = build_refine_crops(sources=cfg.sources, length=cfg.crops_per_epoch,
                                   config=RefineCropConfig(lowres_prob=cfg.lowres_prob))
    if _is_main():
        atomic_write_text(Path(run_dir) / "train_config.json", json.dumps(asdict(cfg), indent=2))
    result = train_loop(model, refine_loss_fn, EpochKeyed(crops), cfg.loop, run_dir, resume=resume,
                        on_progress=on_progress, cancel=cancel)
    return model, result


def export_refiner(model: torch.nn.Module, folder: str | Path, *, name: str, training: dict[str, Any],
                   metrics: dict[str, Any] | None = None, parent: str | None = None, half: bool = False,
                   overwrite: bool = False) -> Path:
    """Write a refinement model folder (``engine.Refiner.from_pretrained`` loads it)."""
    card = ModelCard(name=name, task="refinement", architecture="cascadepsp",
                     config=model.config.to_dict(), metrics=metrics or {}, parent=parent,
                     training={"data": REFINE_DATA_TERMS, **training})
    return save_checkpoint(folder, model.state_dict(), card, half=half, overwrite=overwrite)

