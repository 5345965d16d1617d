"""Checks made before fine-tuning allocates anything: labelled pixels, a sane class count, memory.

Each refuses with one :class:`FineMaskError` (memory: :class:`MemoryBudgetError`) that names the
file or gives the figures, before the base model is evaluated or a training step runs, so a run
that cannot work never starts and no version trained on nothing is ever written.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import FineMaskError
from engine.memory_guard import FRACTION, MemoryBudgetError, free_bytes, plan_batch
from engine.store import PairRecord, Store

#: Most classes a fine-tuned model may get from label ids beyond its base model's classes.
MAX_CLASSES = 1024
#: Refiners train on crops of this side.
REFINE_CROP = 224
#: Bytes kept per element of the layers' outputs (float32) while training, in units of 4 bytes:
#: the activations saved for backward and the gradients alive at the peak. 2 overestimated the
#: measured peak of camvid crops by about 1.9x per crop, 1 underestimated it.
ACTIVATION_FACTOR = 1.5


def require_labelled_pixels(store: Store, train: Sequence[PairRecord], validation: Sequence[PairRecord],
                            ignore: int | None) -> None:
    """Refuse a run whose training pairs, or validation pairs, hold no labelled pixel.

    A pair's pixels are all unlabelled when every class id it holds is ``ignore`` (the store
    records the ids present in each pair's labels). Training on such pairs would learn nothing
    (and divide by zero labelled pixels); validation pairs without labels would leave the new
    version without scores. A store without validation pairs is scored on nothing, as before.
    """
    def unlabelled(recs: Sequence[PairRecord]) -> list[PairRecord]:
        return [r for r in recs if all(c == ignore for c in r.classes)]

    what = "unlabelled" if ignore is None else f"the ignore value {ignore}"
    for split, recs in (("train", train), ("validation", validation)):
        empty = unlabelled(recs)
        if recs and len(empty) == len(recs):
            ids = ", ".join(r.id for r in empty[:5]) + (" ..." if len(empty) > 5 else "")
            where = empty[0].labels_path if len(empty) == 1 else store.root
            raise FineMaskError(
                f"the store's {len(recs)} {split} pair(s) ({ids}) hold no labelled pixels: every label is "
                f"{what}; label some of their pixels (or use another --ignore-index) before fine-tuning",
                where,
            )


def check_class_count(store: Store, ignore: int | None, base_classes: int) -> None:
    """Refuse label ids that would give the model absurdly many classes.

    An id ``c`` makes a model of ``c + 1`` classes. Beyond the base model's classes and beyond
    :data:`MAX_CLASSES`, that is almost surely a labelling mistake (or an unlabelled value not
    given as ``--ignore-index``), and its output layer alone would take gigabytes per crop.
    """
    pairs = store.pairs()
    ids = {c for r in pairs for c in r.classes if c != ignore}
    if not ids:
        return
    top = max(ids)
    if top + 1 > base_classes and top + 1 > MAX_CLASSES:
        rec = next(r for r in pairs if top in r.classes)
        raise FineMaskError(
            f"label id {top} would make a model of {top + 1} classes (the base model has {base_classes}; "
            f"fine-tuning adds classes up to {MAX_CLASSES} in all): fix the labels, or give --ignore-index "
            f"{top} if that value marks unlabelled pixels",
            rec.labels_path,
        )


def check_memory(job: Any, batch_size: int, device: torch.device | str | None = None) -> int:
    """Refuse a fine-tuning run whose estimated peak memory does not fit; return the estimate (bytes).

    Estimate (``engine.memory_guard`` budget: 80% of free memory, ``$FINEMASK_MEMORY_LIMIT``):
    weights, gradients and the two Adam moments (4 x the parameters, float32) and the feature-
    affinity blocks, plus per crop of the (per-process) batch the activations kept for the
    backward pass (1.5 x the sum of every layer's output, from a probe forward on a small input,
    scaled by pixels) and the logits at the output size (4 float32 copies: logits, log-softmax and
    their gradients, per class). ``bench/finetune_memory.py`` compares it with measured peaks.
    ``job`` is a ``SegmentationJob`` (``model``, ``crop``) or ``RefinementJob`` (``model``).
    """
    model: nn.Module = job.model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    batch = max(1, math.ceil(batch_size / world))
    params = sum(p.numel() for p in model.parameters())
    fixed = 4 * 4 * params
    crop = getattr(job, "crop", None)
    if crop is not None:  # a DSRL segmenter: input at half the crop, outputs at the crop
        item = segmentation_item_bytes(model, crop)
        classes = int(model.num_classes)
        if getattr(model, "feature_transform", None) is not None:
            fixed += feature_affinity_bytes(crop, int(model.config.fa_stride))
        what = f"fine-tuning on {batch} crops of {crop[0]}x{crop[1]} pixels with {classes} classes"
        hint = "try a smaller --crop or --batch-size"
    else:
        item = refinement_item_bytes(model)
        what = f"fine-tuning the refiner on {batch} crops of {REFINE_CROP}x{REFINE_CROP} pixels"
        hint = "try a smaller --batch-size"
    total = fixed + batch * item
    on_cpu = device.type == "cpu"
    where = "memory" if on_cpu else f"{device.type.upper()} memory"
    message = (f"{what} needs about {_size(total)} of {where} ({_size(item)} per crop, {_size(fixed)} for "
               f"the weights and optimiser) but only {_size(int(free_bytes(device) * FRACTION))} can be used "
               f"now; {hint}")
    try:  # on a GPU the weights and optimiser live there too: each crop carries its share
        fits = plan_batch(fixed_bytes=fixed if on_cpu else 0, item_bytes=item if on_cpu else item + -(-fixed // batch),
                          wanted=batch, device=device, what=what, unit="crop", hint=hint)
    except MemoryBudgetError:
        raise MemoryBudgetError(message) from None
    if fits < batch:  # training never shrinks its batch: that would change the result
        raise MemoryBudgetError(message)
    return total


def segmentation_item_bytes(model: nn.Module, crop: tuple[int, int]) -> int:
    """Training bytes of one (crop_h, crop_w) crop of a DSRL model (input at half the crop)."""
    step = int(getattr(model, "pad_multiple", 1))
    side = step * max(1, math.ceil(32 / step))
    per_pixel = _kept_per_input_pixel(model, torch.rand(1, 3, side, side))
    h, w = crop
    activations = ACTIVATION_FACTOR * 4 * per_pixel * (h // 2) * (w // 2)
    logits = 4 * 4 * int(model.num_classes) * h * w
    return int(activations + logits)


def refinement_item_bytes(model: nn.Module) -> int:
    """Training bytes of one refiner crop (image and coarse mask of ``REFINE_CROP`` pixels a side)."""
    side = REFINE_CROP // 2
    per_pixel = _kept_per_input_pixel(model, torch.rand(1, 3, side, side), torch.zeros(1, 1, side, side))
    return int(ACTIVATION_FACTOR * 4 * per_pixel * REFINE_CROP * REFINE_CROP)


def feature_affinity_bytes(crop: tuple[int, int], stride: int) -> int:
    """Bytes of the feature-affinity loss's blocks (two float32 row blocks, forward and backward)."""
    from training.losses import fa_rows_per_block

    n = max(1, crop[0] // stride) * max(1, crop[1] // stride)
    return 4 * 4 * fa_rows_per_block(n) * n


def _kept_per_input_pixel(model: nn.Module, *inputs: torch.Tensor) -> float:
    """Elements of all leaf-layer outputs (what backward keeps) per input pixel, from one forward.

    The forward runs in training mode (training-only branches included) without gradients; the
    BatchNorm statistics it touches are restored afterwards.
    """
    total = [0]

    def hook(_module, _args, output):
        outs = output if isinstance(output, (tuple, list)) else (output,)
        total[0] += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    device = next(model.parameters()).device
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model.train()
        with torch.no_grad():
            model(*(x.to(device) for x in inputs))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return total[0] / (inputs[0].shape[-2] * inputs[0].shape[-1])


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


__all__ = ["MAX_CLASSES", "check_class_count", "check_memory", "refinement_item_bytes",
           "require_labelled_pixels", "segmentation_item_bytes"]
