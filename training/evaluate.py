"""Evaluation: segmentation mIoU at full label resolution, refinement IoU / mBA, the SR branch's PSNR/SSIM.

Segmentation follows the DSRL protocol: the network sees the image downscaled to its working
size (CamVid: 240x180) and predicts at 2x (480x360); the ground truth is never downscaled, and
a prediction at another size is resized to the ground truth's (nearest class after bilinear
probability upsampling, as :class:`engine.Segmenter` does).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.metrics import confusion_matrix_open, miou
from engine.segment import Segmenter

ProgressFn = Callable[[int, int, str], None]


@dataclass
class SegmentationScores:
    miou: float
    per_class: dict[str, float]
    pixel_accuracy: float
    images: int

    def as_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "per_class_iou": self.per_class, "pixel_accuracy": self.pixel_accuracy,
                "images": self.images}


def evaluate_segmenter(
    segmenter: Segmenter,
    dataset,
    *,
    working_size: int | None = None,
    on_progress: ProgressFn | None = None,
) -> SegmentationScores:
    """mIoU of ``segmenter`` over ``dataset`` (items ``(image, labels)`` with ``ignore_index``)."""
    classes = list(dataset.classes)
    n = len(classes)
    cm = np.zeros((n + 1, n + 1), np.int64)  # last column: predicted ids the data does not have
    for i in range(len(dataset)):
        image, labels = dataset[i]
        pred = segmenter.predict(image, working_size).labels
        cm += confusion_matrix_open(pred, labels, n, dataset.ignore_index)
        if on_progress is not None:
            on_progress(i + 1, len(dataset), "evaluated")
    per_class = miou(cm)[1][:n]
    valid = ~np.isnan(per_class)
    mean = float(per_class[valid].mean()) if valid.any() else float("nan")
    return SegmentationScores(
        miou=mean,
        per_class={c: float(v) for c, v in zip(classes, per_class)},
        pixel_accuracy=float(np.trace(cm) / max(cm.sum(), 1)),
        images=len(dataset),
    )


def segmenter_from_training_model(model: torch.nn.Module, card) -> Segmenter:
    """An inference :class:`Segmenter` built from a training model's weights (SISR dropped)."""
    from engine.models import create_model
    from engine.segment import load_inference_state

    inference = create_model(model.config, inference=True)
    load_inference_state(inference, model.state_dict(), "training model")
    return Segmenter(inference, card, device="cpu")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, data_range]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004; Gaussian window, sigma 1.5) of two images in [0, 1]."""
    from skimage.metrics import structural_similarity

    channel_axis = -1 if np.asarray(a).ndim == 3 else None
    return float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=channel_axis))


# --- refinement -----------------------------------------------------------------------------

#: The ground truth is shrunk by this factor and enlarged back (bilinear) to make coarse masks.
COARSE_FACTOR = 8


@dataclass
class RefinementScores:
    """IoU and mBA (fractions) of coarse and refined masks, per class and overall.

    ``rows``: one dict per (image, class, source) with ``iou_before``, ``iou_after``,
    ``mba_before``, ``mba_after``; ``source`` is ``"gt/8"`` (shrunk ground truth) or
    ``"segmenter"`` (the segmenter's class mask at its working size).
    """

    rows: list[dict[str, Any]]

    def summary(self) -> list[dict[str, Any]]:
        """Means per (source, class), then per source over all classes (class ``"all"``)."""
        out = []
        for source in dict.fromkeys(r["source"] for r in self.rows):
            rows = [r for r in self.rows if r["source"] == source]
            for cls in [*dict.fromkeys(r["class"] for r in rows), "all"]:
                chosen = [r for r in rows if cls in ("all", r["class"])]
                mean = {k: float(np.nanmean([r[k] for r in chosen]))
                        for k in ("iou_before", "iou_after", "mba_before", "mba_after")}
                out.append({"source": source, "class": cls, "images": len(chosen), **mean})
        return out


def coarse_mask(mask: np.ndarray, factor: int = COARSE_FACTOR) -> np.ndarray:
    """``mask`` shrunk by ``factor`` (anti-aliased) and enlarged back bilinearly, at 0.5."""
    from training.perturb import lowres_mask

    return lowres_mask(mask, factor)


def evaluate_refiner(refiner, dataset, indices: list[int], *, segmenter: Segmenter | None = None,
                     working_size: int | None = None, L: int = 900, fast: bool = False,
                     skip_global: bool = False, on_progress: ProgressFn | None = None) -> RefinementScores:
    """Refine each class mask of the chosen ``dataset`` images at full resolution.

    ``dataset.binary_masks(i)`` gives the image and ``{class: bool mask}`` of the classes present.
    Coarse inputs: the ground truth shrunk by :data:`COARSE_FACTOR`, and with ``segmenter`` its
    prediction for the same class (matched by name) at ``working_size``. Classes whose ground
    truth has no boundary at a radius mBA needs give NaN mBA and are left out of its means.
    """
    from engine.metrics import boundary_accuracy

    rows: list[dict[str, Any]] = []
    for k, i in enumerate(indices):
        image, masks = dataset.binary_masks(i)
        coarse = {("gt/8", c): coarse_mask(m) for c, m in masks.items()}
        if segmenter is not None:
            labels = segmenter.predict(image, working_size).labels
            names = segmenter.classes
            for c in masks:
                if c in names:
                    coarse[("segmenter", c)] = labels == names.index(c)
        for (source, c), before in coarse.items():
            gt = masks[c]
            after = refiner.refine(image, before, fast=fast, L=L, skip_global=skip_global) > 0.5
            rows.append({"image": dataset.stem(i), "class": c, "source": source,
                         "iou_before": _iou(before, gt), "iou_after": _iou(after, gt),
                         "mba_before": boundary_accuracy(before, gt), "mba_after": boundary_accuracy(after, gt)})
        if on_progress is not None:
            on_progress(k + 1, len(indices), dataset.stem(i))
    return RefinementScores(rows)


def evaluate_refiner_crops(model: torch.nn.Module, crop_sets: dict[str, Any], count: int, *,
                           batch_size: int = 16, on_progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """The refinement module on its training task: perturbed crops, one cascade forward each.

    ``crop_sets`` maps a source name to a dataset of ``(image [0, 1], gt, coarse)`` crops like
    :class:`training.data.refine_crops.RefineCrops` (fixed seed, so the same crops every call);
    the first ``count`` of each are scored. Returns one row per source and an ``"all"`` row, with
    mean IoU and mBA (fractions) of the coarse mask and of the pass-3 OS1 output: a check of
    what a training run has learnt, without the full-resolution cascade of :func:`evaluate_refiner`.
    """
    from engine.metrics import boundary_accuracy
    from engine.models.cascadepsp import normalise_image

    param = next(model.parameters())
    model.eval()
    scores: dict[str, list[tuple[float, float, float, float]]] = {}
    done, total = 0, count * len(crop_sets)
    for source, crops in crop_sets.items():
        scores[source] = []
        for start in range(0, count, batch_size):
            items = [crops[i] for i in range(start, min(start + batch_size, count))]
            image, gt, coarse = (torch.stack([it[k] for it in items]) for k in range(3))
            with torch.inference_mode():
                logits = model(normalise_image(image.to(param)), coarse.to(param) * 2 - 1)["pass3_os1"]
            refined = (logits.float() > 0).cpu().numpy()[:, 0]
            for g, c, r in zip(gt.numpy()[:, 0] > 0.5, coarse.numpy()[:, 0] > 0.5, refined):
                scores[source].append((_iou(c, g), _iou(r, g), boundary_accuracy(c, g), boundary_accuracy(r, g)))
            done += len(items)
            if on_progress is not None:
                on_progress(done, total, source)
    scores["all"] = [s for rows in scores.values() for s in rows]
    keys = ("iou_before", "iou_after", "mba_before", "mba_after")
    return [{"source": source, "crops": len(rows),
             **dict(zip(keys, map(float, np.nanmean(np.asarray(rows, np.float64).reshape(-1, 4), axis=0))))}
            for source, rows in scores.items()]


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.count_nonzero(pred | gt)
    return np.count_nonzero(pred & gt) / union if union else 1.0


# --- the SR branch --------------------------------------------------------------------------


@dataclass
class SRScores:
    """Mean PSNR (dB) and SSIM of the SR branch and of bicubic upsampling, per image in ``rows``."""

    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    rows: list[dict[str, Any]]


def sr_model(name_or_path: str | Path):
    """A DSRL training model with its SISR branch, from a model folder that kept the branch."""
    from engine.checkpoints import load_checkpoint
    from engine.errors import FineMaskError
    from engine.models import SegmenterConfig, create_model

    state, card = load_checkpoint(name_or_path)
    config = SegmenterConfig.from_dict(card.config)
    if not config.sisr or not any(k.startswith("sisr.") for k in state):
        raise FineMaskError("this model has no SR branch (a baseline or SSSR variant, or saved for inference "
                            "only)", Path(str(name_or_path)))
    model = create_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k.startswith("sisr.")] or unexpected:
        raise FineMaskError("the SR branch's weights do not match the card", Path(str(name_or_path)))
    return model.eval()


def evaluate_sr(model, folder: str | Path, scale: int = 2, on_progress: ProgressFn | None = None) -> SRScores:
    """PSNR and SSIM of the SR branch on ``folder``'s ``*_LR.png`` / ``*_HR.png`` pairs, and of bicubic.

    The usual SR protocol: luma (ITU-R BT.601 Y, in [16, 235] / 255) with ``scale`` pixels shaved
    off each border; HR is cropped to twice the LR size. ``model`` outputs ``sr`` at 2x (an image,
    or for ``sr_target="residual"`` the residual added to the bicubic upsampling).
    """
    from engine.io import read_image
    from engine.preprocess import pad_to_multiple
    from training.sr_target import bicubic_up, sr_image

    if scale != 2:
        raise ValueError("the SR branch upsamples by 2")
    folder = Path(folder)
    pairs = sorted(folder.glob("*_LR.png"))
    if not pairs:
        from engine.errors import FineMaskError

        raise FineMaskError("no *_LR.png / *_HR.png pairs found", folder)
    rows = []
    for k, lr_path in enumerate(pairs):
        lr = torch.from_numpy(read_image(lr_path)).permute(2, 0, 1)[None]
        hr = read_image(lr_path.with_name(lr_path.name.replace("_LR.png", "_HR.png")))
        h, w = lr.shape[-2:]
        hr = hr[: 2 * h, : 2 * w]
        with torch.inference_mode():
            x, _ = pad_to_multiple(lr, model.pad_multiple)
            out = model(x).sr[:, :, : 2 * h, : 2 * w].float()
            sr = sr_image(lr, out) if model.config.sr_target == "residual" else out.clamp(0, 1)
            bic = bicubic_up(lr, (2 * h, 2 * w))
        sr_y, bic_y = (_luma(t[0].permute(1, 2, 0).numpy(), scale) for t in (sr, bic))
        hr_y = _luma(hr, scale)
        rows.append({"image": lr_path.name.replace("_LR.png", ""),
                     "psnr": psnr(sr_y, hr_y), "ssim": ssim(sr_y, hr_y),
                     "bicubic_psnr": psnr(bic_y, hr_y), "bicubic_ssim": ssim(bic_y, hr_y)})
        if on_progress is not None:
            on_progress(k + 1, len(pairs), rows[-1]["image"])
    mean = {key: float(np.mean([r[key] for r in rows])) for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}
    return SRScores(rows=rows, **mean)


def _luma(rgb: np.ndarray, shave: int) -> np.ndarray:
    """BT.601 luma of RGB in [0, 1], in [16/255, 235/255], with ``shave`` border pixels removed."""
    y = (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    return y[shave:-shave, shave:-shave] if shave else y
