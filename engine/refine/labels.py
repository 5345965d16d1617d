"""A label map refined in one pass: the classes share the work (``Refiner.refine_labels``).

Each refined class (``engine.refine.classes.plan_classes``) is the binary refinement of its mask
inside its box, exactly as ``Refiner.refine`` would do it on the box alone (the *per-class path*,
``engine.refine.classes.arbitrate_classes``, which ``engine.huge`` runs tile by tile on a
cluster). What is shared:

- the global step's image input is computed once per box (classes scattered over the whole
  image - lesions, small objects - often have the same box: the image);
- the local step's (tile, class) pairs are grouped by the image crop they read: each crop is
  read and normalised once and its pairs run as one batch (up to the tile batch size);
- classes whose box holds no boundary, and the largest class (the complement), are not refined.

Each class's tiles are blended in its own grid order, so with a tile batch of 1 (the CPU default)
the result equals the per-class path bit for bit; larger batches mix classes in one forward pass
and may differ in the last float bits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import Cancelled
from ..models.cascadepsp import normalise_image
from ..tiling import Tile, TileAccumulator, max_overlap, tile_grid
from .classes import Box, ClassPlan, arbitrate
from .inputs import unit_rgb
from .results import GlobalResult, coarse_as_global, keep_unseen
from .selection import TILE_MARGIN, select_tiles

if TYPE_CHECKING:
    from .refiner import Refiner

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def refine_label_map(refiner: Refiner, image: np.ndarray, labels: np.ndarray, probs: Any, plan: ClassPlan, *,
                     fast: bool, L: int, selection: str, batch_size: int | None, skip_global: bool,
                     on_progress: ProgressFn | None, cancel: CancelFn | None,
                     return_confidence: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Refine every class of ``plan`` and arbitrate; see the module docstring."""
    refined = plan.refined
    n_global = 0 if skip_global else len(refined)
    done = 0

    def progress(total: int, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("refinement cancelled")
        if on_progress is not None:
            on_progress(done, total, message)

    def _kept(conf: np.ndarray, c: int, glob: GlobalResult) -> np.ndarray:
        y0, y1, x0, x1 = plan.boxes[c]
        return keep_unseen(conf, labels[y0:y1, x0:x1] == c, glob, fast=fast)

    # 1. The global step of every class (or its coarse mask, for the local mode).
    globs: dict[int, GlobalResult] = {}
    images: dict[Box, torch.Tensor] = {}
    for c in refined:
        progress(n_global + 1, f"class {c}: {'reading the mask' if skip_global else 'global step'}")
        y0, y1, x0, x1 = box = plan.boxes[c]
        mask = labels[y0:y1, x0:x1] == c
        if skip_global:
            globs[c] = coarse_as_global(mask, _identity)
            continue
        view = image[y0:y1, x0:x1]
        if box not in images:
            images[box] = refiner.global_image(view, L)
        globs[c] = refiner.global_step(view, mask, _identity, L, img=images[box])
        done += 1
    images.clear()
    if fast:
        progress(n_global, "done")
        confs: Iterator[tuple[int, np.ndarray]] = ((c, _kept(refiner.upsample_global(globs[c]), c, globs.pop(c)))
                                                   for c in refined)
        return arbitrate(labels, probs, plan, confs, return_confidence=return_confidence)

    # 2. The local step: (tile, class) pairs grouped by the image crop they read.
    accs: dict[int, TileAccumulator] = {}
    groups: dict[Box, list[tuple[int, Tile]]] = {}
    n_tiles = 0
    for c in refined:
        y0, y1, x0, x1 = plan.boxes[c]
        tiles = tile_grid(y1 - y0, x1 - x0, L, margin=TILE_MARGIN)
        accs[c] = TileAccumulator(y1 - y0, x1 - x0, max_overlap(tiles))
        n_tiles += len(tiles)
        for t in select_tiles(tiles, globs[c], selection, core_margin=L // 8):
            groups.setdefault((y0 + t.y0, y0 + t.y1, x0 + t.x0, x0 + t.x1), []).append((c, t))
    # x-major, as each class's grid: every class's tiles are blended in its own grid order
    order = sorted(groups, key=lambda k: (k[2], k[0]))
    n_pairs = sum(len(v) for v in groups.values())
    total = n_global + n_pairs + 1
    th, tw = max(k[1] - k[0] for k in order) if order else 1, max(k[3] - k[2] for k in order) if order else 1
    bs = batch_size or refiner.adaptive_batch_size(th, tw)
    refiner.stats.tiles_total = n_tiles
    refiner.stats.tiles_processed, refiner.stats.batch_size, refiner.stats.crops = n_pairs, bs, len(order)
    progress(total, f"local step: {n_pairs} tiles of {len(refined)} classes, {len(order)} image crops")
    for key in order:
        y0, y1, x0, x1 = key
        crop = torch.from_numpy(unit_rgb(np.asarray(image[y0:y1, x0:x1]))).permute(2, 0, 1)[None]
        crop = normalise_image(crop.to(refiner.device))
        pairs = groups[key]
        for b0 in range(0, len(pairs), bs):
            chunk = pairs[b0:b0 + bs]
            preds = refiner.predict_regions(crop, [globs[c] for c, _ in chunk], [t for _, t in chunk])
            for (c, t), p in zip(chunk, preds):
                accs[c].add(t, p)
            done += len(chunk)
            progress(total, "local step")

    def confidences() -> Iterator[tuple[int, np.ndarray]]:
        for c in refined:
            acc, glob = accs.pop(c), globs.pop(c)
            yield c, _kept(acc.finish(fallback=glob.full_rows), c, glob)

    out = arbitrate(labels, probs, plan, confidences(), return_confidence=return_confidence)
    if on_progress is not None:
        on_progress(total, total, "done")
    return out
