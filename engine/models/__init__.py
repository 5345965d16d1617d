"""The DSRL segmenter: config, encoders, decoders (DeepLabv3+, DUpsampling), SISR branch.

``create_model(SegmenterConfig(...))`` builds the training model; ``inference=True`` builds
only encoder, decoder and SSSR head.
"""
from __future__ import annotations

from .config import VARIANTS, SegmenterConfig
from .dsrl import DSRL, DSRLOutput, create_model, strip_training_branches
from .dupsampling import fit_basis

__all__ = [
    "DSRL",
    "VARIANTS",
    "DSRLOutput",
    "SegmenterConfig",
    "create_model",
    "fit_basis",
    "strip_training_branches",
]
