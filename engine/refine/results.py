"""What the two steps hand over: the global step's result (``GlobalResult``) and run statistics."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..tiling import STRIP_ROWS, Tile, bilinear_region


@dataclass
class RefineStats:
    """What the last ``refine`` call did (for benchmarks and logs). Times in seconds."""

    global_seconds: float = 0.0
    local_seconds: float = 0.0
    tiles_total: int = 0
    tiles_processed: int = 0
    batch_size: int = 0
    selection: str = ""
    processed: list[Tile] = field(default_factory=list)
    crops: int = 0  # image crops read by the local step (``refine_labels`` shares them between classes)


@dataclass
class GlobalResult:
    """Output of the global step at the reduced size (gh, gw): float32 CPU tensors in [0, 1].

    ``coarse_as_global`` puts the coarse mask itself here instead, as uint8 0/1 at full resolution:
    then ``origin`` is set, and the maps are the window of the full-size map starting there
    (``window`` cuts one, so a cluster task gets only the rows and columns its tiles read).
    """

    os1: torch.Tensor
    os4: torch.Tensor
    full_shape: tuple[int, int]
    origin: tuple[int, int] | None = None
    #: The coarse mask as the global step saw it: its coverage at (gh, gw), float32 in [0, 1].
    seen: torch.Tensor | None = None

    def window(self, rows: tuple[int, int], cols: tuple[int, int]) -> GlobalResult:
        """The full-resolution window ``rows`` x ``cols`` (full-image coordinates) of this result."""
        if self.origin is None:
            raise ValueError("only a full-resolution result (origin set) has windows")
        (r0, r1), (c0, c1), (oy, ox) = rows, cols, self.origin
        # copies, not views: a pickled view would carry the whole full-size storage
        part = self.os1[r0 - oy:r1 - oy, c0 - ox:c1 - ox].clone()
        os4 = part if self.os4 is self.os1 else self.os4[r0 - oy:r1 - oy, c0 - ox:c1 - ox].clone()
        return GlobalResult(part, os4, self.full_shape, (r0, c0))

    def full_rows(self, r0: int, r1: int, which: str = "os1") -> np.ndarray:
        """Rows [r0, r1) of the map resized to the full image (bilinear), float32 (r1-r0, W)."""
        return self._resized(which, (r0, r1), (0, self.full_shape[1])).numpy()

    def region(self, tile: Tile, which: str) -> torch.Tensor:
        return self._resized(which, (tile.y0, tile.y1), (tile.x0, tile.x1))

    def _resized(self, which: str, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        low = self.os1 if which == "os1" else self.os4
        if self.origin is not None:  # full resolution already: a plain slice
            (r0, r1), (c0, c1), (oy, ox) = rows, cols, self.origin
            if r0 < oy or c0 < ox or r1 - oy > low.shape[0] or c1 - ox > low.shape[1]:
                raise ValueError(f"rows {rows}, cols {cols} are outside this window")
            return low[r0 - oy:r1 - oy, c0 - ox:c1 - ox].float()
        return bilinear_region(low, self.full_shape, rows, cols)



def coarse_as_global(mask: np.ndarray, binarise: Callable[[np.ndarray], np.ndarray]) -> GlobalResult:
    """The binarised coarse mask in place of a global result (``skip_global``): full size, uint8 0/1."""
    fg = torch.from_numpy(binarise(np.asarray(mask)).astype(np.uint8, copy=False))
    return GlobalResult(os1=fg, os4=fg, full_shape=tuple(fg.shape), origin=(0, 0))


#: Coverage bounds of the boundary zone the fast mode leaves as it is (``keep_unseen``).
EDGE_ZONE = 1e-3
#: The fast mode removes a region only on a decisive verdict: confidence below 1 minus this.
DECISIVE = 0.9


def keep_unseen(conf: np.ndarray, mask: np.ndarray, glob: GlobalResult,
                binarise: Callable[[np.ndarray], np.ndarray] = lambda a: a, *, fast: bool = False) -> np.ndarray:
    """Keep the mask where the global step could not see it; ``conf`` (H, W) is changed in place.

    The global step works at L px: a structure narrower than a few of its pixels (a lesion of
    4K fundus photo at L = 900) covers less than half of every reduced pixel, so the network is
    shown "background" there and can only erase it - and the local step, which starts from the
    global result, cannot bring it back. Where the coarse mask holds but its reduced coverage
    (``glob.seen``, enlarged bilinearly like the result) is at most 0.5, the confidence is set to
    1: refinement decides only about what it could see. (Not in the reference, which erases such
    structures; measured in docs/RESULTS.md.)

    ``fast`` (the global step's result is the answer) is stricter, because the light model's
    verdicts at L px proved unreliable (docs/RESULTS.md): the coarse mask is kept within about one
    reduced pixel of its boundary (coverage strictly between ``EDGE_ZONE`` and ``1 - EDGE_ZONE``:
    the global step cannot place a boundary more finely than its pixel; gt/8 masks at 4K lost 4-5
    IoU points without this), nothing is added (regions the light model "found" on alpha-matting
    composites were all wrong), and a region is removed only on a decisive verdict (confidence
    below ``1 - DECISIVE``) where it fills at least 3 x 3 reduced pixels.
    """
    if glob.seen is None:
        return conf
    seen = glob.seen
    if fast:  # let go only of what fills 3 x 3 reduced pixels
        seen = -torch.nn.functional.max_pool2d(-glob.seen[None, None], 3, stride=1, padding=1)[0, 0]
    H, W = glob.full_shape
    for r0 in range(0, H, STRIP_ROWS):
        r1 = min(H, r0 + STRIP_ROWS)
        cover = bilinear_region(glob.seen, (H, W), (r0, r1), (0, W)).numpy()
        fg = binarise(np.asarray(mask[r0:r1]))
        strip = conf[r0:r1]
        if fast:
            zone = (cover > EDGE_ZONE) & (cover < 1 - EDGE_ZONE)
            np.copyto(strip, fg.astype(np.float32), where=zone)
            strip[~fg] = 0.0
            strip[fg & (strip > 1 - DECISIVE)] = 1.0
            cover = bilinear_region(seen, (H, W), (r0, r1), (0, W)).numpy()
        strip[fg & (cover <= 0.5)] = 1.0
    return conf
