"""What a batch runs: its settings (sent to every worker) and one job per input image."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoints import resolve
from ..errors import FineMaskError
from ..huge import HUGE_MAX_PIXELS, HUGE_PIXELS
from ..refine import SELECTIONS

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

LABELS_SUFFIX = ".tif"


@dataclass(frozen=True)
class BatchConfig:
    """What to run on each image (sent to every worker).

    ``model``: segmenter name or checkpoint folder. ``refiner``: refinement model, or None to
    write the segmentation unrefined. ``fast``, ``skip_global``, ``L``, ``selection``: as
    ``Refiner.refine``.
    ``working_size``: segmenter's longer side (default: the model's). ``tile_batch``: tiles per
    refinement batch (default: 1 on CPU workers, 8 on GPU workers). ``precision``: refiner
    precision (``"auto"``, ``"float32"``, ``"bfloat16"``). ``device``: ``"cpu"``, ``"cuda"``, or
    None (a GPU per worker when there are GPUs). ``huge_pixels``: TIFF/zarr images with more pixels
    take the lazy path. ``max_pixels``: limit for images read whole (default: engine.io's);
    ``huge_max_pixels``: limit for images read in parts.
    """

    model: str = "camvid"
    refiner: str | None = None
    fast: bool = False
    skip_global: bool = False
    L: int = 900
    working_size: int | None = None
    selection: str = "cover"
    tile_batch: int | None = None
    precision: str = "auto"
    device: str | None = None
    huge_pixels: int = HUGE_PIXELS
    max_pixels: int | None = None
    huge_max_pixels: int = HUGE_MAX_PIXELS

    def checked(self) -> BatchConfig:
        """Validated copy with model folders made absolute (workers may run elsewhere)."""
        if self.L < 96:
            raise FineMaskError(f"L must be at least 96, got {self.L}")
        if self.selection not in SELECTIONS:
            raise FineMaskError(f"tile selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.fast and self.skip_global:
            raise FineMaskError("fast (global step only) and skip_global (local step only) exclude each other")
        if self.tile_batch is not None and self.tile_batch < 1:
            raise FineMaskError(f"tile batch must be at least 1, got {self.tile_batch}")
        return replace(self, model=model_ref(self.model),
                       refiner=None if self.refiner is None else model_ref(self.refiner))


@dataclass
class Job:
    """One input image and its output; ``error`` is set when it cannot be run at all."""

    source: Path
    output: Path
    error: str = ""

    @property
    def name(self) -> str:
        return self.source.name


def model_ref(name_or_path: str) -> str:
    """A model folder as an absolute path; a shipped name as is (checked to exist)."""
    path = Path(name_or_path).expanduser()
    folder = resolve(name_or_path)
    return str(folder.resolve()) if path.exists() else str(name_or_path)
