"""CascadePSP refinement of a coarse mask at any resolution (4K, 8K, 16K).

``Refiner.refine(image, mask)`` returns a float32 confidence map in [0, 1] at full size:

1. Global step: the image and mask shrunk so the longest side is ``L`` (area averaging; enlarged
   with bicubic / bilinear when smaller), padded to a multiple of 8, three cascade passes.
   ``fast=True`` stops here and resizes the result to full size.
2. Local step: ``L`` x ``L`` tiles at full resolution on the reference grid (stride L/2, 16 px
   margins, see ``engine.tiling.tile_grid``). A tile gets the thresholded global result as its
   mask and the global OS4 output as its OS8 estimate, and runs passes 2 and 3. Only some tiles
   run (``selection``):

   - ``"cover"`` (default): a greedy smallest set of boundary tiles such that every boundary
     pixel lies at least L/8 px inside (away from inner edges of) one chosen tile;
   - ``"fraction"`` (the reference): 10% to 90% of the tile is foreground;
   - ``"boundary"``: the region the tile writes contains a mask boundary pixel;
   - ``"all"``: every tile.

   Measured (docs/BENCHMARKS.md): ``"cover"`` reaches every coarse-mask error within 64 px of the
   mask boundary with the fewest tiles; ``"fraction"`` skips tiles whose object is small (under
   10% of the tile) and so misses small objects; ``"boundary"`` reaches as much as ``"cover"`` with
   about twice the tiles.

   16 px are trimmed from inner tile edges, overlaps are averaged, and pixels no tile wrote keep
   the global result.

   ``skip_global=True`` (not in the reference) runs the local step on the coarse mask itself: its
   tiles get the binarised input as both mask and OS8 estimate. For masks that are already right
   at the global step's pixel size (a segmentation made at a reduced size and enlarged; lesions a
   few pixels wide once a 4K image is shrunk to L), the global step can only erase detail
   (docs/RESULTS.md, IDRiD at 4K), so it is better skipped. The apps call this the "local" mode
   (``engine.refine_modes``).

Beyond the reference: tiles run in batches sized to free memory; the only full-size buffers are
the float32 result and a uint8 overlap count (inputs are read one tile or row strip at a time),
so memory is bounded by the batch, not the image; the module runs with BatchNorms folded and its
decoder reordered (``engine.models.cascadepsp.fuse_for_inference``), channels_last, under
``torch.inference_mode``, in bfloat16 on CUDA (autocast) and on CPUs with native bf16; a progress
callback and a cancel check; the output is deterministic for a given batch size.

Deviations from the reference, each for a stated reason:

- the default tile selection is ``"cover"``, not the reference's 10%-90% rule (see above);
- pixels no tile wrote keep the global *confidence*; the reference keeps the thresholded global
  mask. Both threshold to the same mask at 0.5, and the soft value is a better confidence for
  multi-class arbitration and for the uncertainty shown to users;
- full-size resampling uses ``align_corners=False`` everywhere (the reference's fast mode uses
  ``True`` when enlarging); this matches how the local step reads the same global result;
- sizes of the reduced image are computed from ``L`` (long side exactly ``L``) instead of a scale
  factor, avoiding off-by-one sizes from float rounding;
- bfloat16 on CPUs that support it (the reference is float32 on CPU): twice the convolution
  speed; probabilities moved by about 1e-3 in our tests (``precision="float32"`` turns it off).

Modules: ``refiner`` (``Refiner``: the two steps, batching, precision), ``selection`` (which tiles
run), ``classes`` (label maps: per-class boxes and arbitration), ``loading`` (checkpoints and the
official weights), ``results`` (what the global step hands to the local step), ``inputs`` (input
checks and conversions). The network itself is ``engine.models.cascadepsp``.
"""
from __future__ import annotations

from .classes import ClassPlan, arbitrate, arbitrate_classes, class_counts, enlarged_bboxes, plan_classes
from .inputs import global_size
from .refiner import PRECISIONS, RefinementCancelled, Refiner, cpu_has_bf16
from .results import GlobalResult, RefineStats, coarse_as_global
from .selection import SELECTIONS, TILE_MARGIN, select_tiles

__all__ = ["PRECISIONS", "SELECTIONS", "TILE_MARGIN", "ClassPlan", "GlobalResult", "RefineStats", "RefinementCancelled",
           "Refiner", "arbitrate", "arbitrate_classes", "class_counts", "coarse_as_global", "cpu_has_bf16",
           "enlarged_bboxes", "global_size", "plan_classes", "select_tiles"]
