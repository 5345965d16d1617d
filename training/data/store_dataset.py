"""The pairs of an annotation store as a segmentation dataset, at the scale a model sees them."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.store import PairRecord, Store
from training.augment import resize_image, resize_labels

from .readers import CachedDataset, SegmentationDataset

#: Ignore value when the store marks no pixels as unlabelled: never a class id (uint16 labels).
NO_IGNORE = 65535


class StoreDataset(CachedDataset):
    """Items ``(image float32 (H, W, 3) in [0, 1], labels int64 (H, W))`` of some store pairs.

    ``longer_side``: each pair is resized (image anti-aliased, labels nearest) so that its longer
    side has this many pixels: a DSRL model's output size (twice its working size), so training
    sees objects at the scale inference will. None keeps the stored size. Items are decoded
    once and kept in memory as uint8. ``min_length``: the dataset repeats its pairs to at least
    this many items (a batch needs two or more crops for BatchNorm, even from a single pair).
    """

    def __init__(self, store: Store, pairs: Sequence[PairRecord], classes: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, ignore_index: int | None = None,
                 longer_side: int | None = None, min_length: int = 1):
        # CachedDataset's item cache and accessors, filled from the store instead of a base dataset
        SegmentationDataset.__init__(self, f"store {store.root.name}", [p.image_path for p in pairs], classes,
                                     palette, NO_IGNORE if ignore_index is None else ignore_index)
        self.base, self.scale = None, 1.0
        self.store, self.pairs, self.longer_side = store, list(pairs), longer_side
        self.length = max(len(self.pairs), int(min_length))
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def stem(self, index: int) -> str:
        return self.pairs[index % len(self.pairs)].id

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index %= len(self.pairs)
        if index not in self._items:
            image, labels = self.store.load(self.pairs[index].id)
            if self.longer_side is not None:
                f = self.longer_side / max(labels.shape)
                shape = (max(1, round(labels.shape[0] * f)), max(1, round(labels.shape[1] * f)))
                if shape != labels.shape:
                    image, labels = resize_image(image, shape), resize_labels(labels, shape)
            self._items[index] = (np.round(image * 255.0).astype(np.uint8), labels.astype(np.int64))
        return self._items[index]


__all__ = ["NO_IGNORE", "StoreDataset"]
