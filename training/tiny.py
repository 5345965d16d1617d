"""Tiny randomly initialised models, saved as checkpoint folders, for tests and smoke runs.

They have the real architectures at a fraction of the width, so every code path (loading,
inference, fine-tuning, the apps) runs in well under a second per call on one CPU core.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints import ModelCard, save_checkpoint
from engine.io import default_palette

#: Widths of the tiny DSRL segmenter (every variant accepts them).
TINY_SEGMENTER = dict(encoder_width=0.25, aspp_channels=16, low_level_channels=8, decoder_channels=16,
                      head_channels=8, sr_channels=8, ft_channels=8)
#: Widths of the tiny light refiner.
TINY_REFINER = dict(backbone="light", stage_channels=(8, 16, 16, 24), psp_channels=16,
                    decoder_channels=(8, 8, 4), head_channels=8)


def make_tiny_segmenter(folder: str | Path, num_classes: int = 3, input_size: tuple[int, int] = (64, 48),
                        name: str = "tiny", variant: str = "dsrl", seed: int = 0, **config) -> Path:
    """Save a tiny DSRL model (full training state, SISR included) to ``folder``; return it.

    ``input_size`` is the working size (width, height); classes are named ``class 0`` ...
    ``config`` overrides ``SegmenterConfig`` fields (say ``dropout=0.0``).
    """
    from engine.models import SegmenterConfig, create_model

    torch.manual_seed(seed)
    model = create_model(SegmenterConfig.for_variant(variant, num_classes, **{**TINY_SEGMENTER, **config}))
    card = ModelCard(name=name, task="segmentation", architecture="dsrl", config=model.config.to_dict(),
                     classes=[f"class {i}" for i in range(num_classes)],
                     palette=[list(map(int, c)) for c in default_palette(num_classes)[:num_classes]],
                     input_size=[int(input_size[0]), int(input_size[1])],
                     training={"note": "tiny random model for tests"})
    return save_checkpoint(folder, model.state_dict(), card, overwrite=True)


def make_tiny_refiner(folder: str | Path, name: str = "tiny-refiner", seed: int = 0) -> Path:
    """Save a tiny light CascadePSP refinement module to ``folder``; return it."""
    from engine.models.cascadepsp import RefinementModule, RefinerConfig
    from engine.refine import Refiner

    torch.manual_seed(seed)
    refiner = Refiner(RefinementModule(RefinerConfig(**TINY_REFINER)), device="cpu")
    return refiner.save(folder, name=name, overwrite=True, training={"note": "tiny random model for tests"})


__all__ = ["TINY_REFINER", "TINY_SEGMENTER", "make_tiny_refiner", "make_tiny_segmenter"]
