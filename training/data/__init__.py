"""Datasets for training: readers, DSRL pairs and refinement crops.

- :func:`load_dataset` (``camvid``, ``dubai``, ``idrid``, ``isbi2012``) returns a reader whose items
  are ``(image float32 (H, W, 3) in [0, 1], labels (H, W))`` with ``classes``, ``palette`` and
  ``ignore_index``.
- :class:`DSRLPairs` turns a reader into ``(lr, hr, label)`` tensors for DSRL training.
- :class:`RefineCrops` / :func:`build_refine_crops` give ``(image, gt, coarse)`` 224 x 224 crops
  for the CascadePSP refiner.
"""

from .dsrl_pairs import DSRLPairConfig, DSRLPairs
from .readers import CachedDataset, FolderDataset, ListFileDataset, MaskFolderDataset, SegmentationDataset
from .refine_crops import (
    AlphaCompositeSource,
    ClassMaskSource,
    RefineCropConfig,
    RefineCrops,
    build_refine_crops,
)
from .registry import SPLITS, data_root, load_dataset

__all__ = [
    "AlphaCompositeSource",
    "CachedDataset",
    "ClassMaskSource",
    "DSRLPairConfig",
    "DSRLPairs",
    "FolderDataset",
    "ListFileDataset",
    "MaskFolderDataset",
    "RefineCropConfig",
    "RefineCrops",
    "SPLITS",
    "SegmentationDataset",
    "build_refine_crops",
    "data_root",
    "load_dataset",
]
