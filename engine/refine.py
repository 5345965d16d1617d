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
decoder reordered (``engine.models.refine.fuse_for_inference``), channels_last, under
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
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import ModelCard, load_checkpoint, save_checkpoint
from .errors import Cancelled, FineMaskError
from .memory_guard import activation_bytes_per_pixel, plan_batch
from .models.refine import (
    RefinementModule,
    RefinerConfig,
    build_refinement_module,
    fuse_for_inference,
    normalise_image,
)
from .tiling import (
    STRIP_ROWS,
    Tile,
    TileAccumulator,
    area_resize,
    bilinear_region,
    max_overlap,
    reuse_freed_memory,
    source_span,
    tile_grid,
)

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

ARCHITECTURE = "cascadepsp"
SELECTIONS = ("fraction", "boundary", "cover", "all")
PRECISIONS = ("auto", "float32", "bfloat16")
TILE_MARGIN = 16
FRACTION_RANGE = (0.1, 0.9)


#: Kept as a name for old imports; refinement raises ``engine.errors.Cancelled``.
RefinementCancelled = Cancelled


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


# --------------------------------------------------------------------------------------------
# Input handling: arrays are read one crop at a time, never converted whole.


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise FineMaskError(f"image must be a numpy array, got {type(image).__name__}")
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
    if shape_ok and image.dtype.kind in "uifb":
        if min(image.shape[:2]) < 1:
            raise FineMaskError(f"image is empty (shape {image.shape})")
        return image
    raise FineMaskError(f"image must be (H, W, 3) uint8 or float in [0, 1], got shape {image.shape} "
                        f"dtype {image.dtype}")


def _unit_rgb(crop: np.ndarray) -> np.ndarray:
    """An image crop (h, w[, C]) as float32 RGB in [0, 1], shape (h, w, 3)."""
    if crop.ndim == 2:
        crop = crop[:, :, None]
    crop = crop[:, :, :3]
    if crop.dtype == np.uint8:
        out = crop.astype(np.float32) / 255.0
    elif crop.dtype == np.uint16:
        out = crop.astype(np.float32) / 65535.0
    elif crop.dtype.kind in "iu":
        out = crop.astype(np.float32) / float(np.iinfo(crop.dtype).max)
    else:
        out = crop.astype(np.float32, copy=False)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out


def _mask_binariser(mask: Any, shape: tuple[int, int]) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Validate ``mask`` against the image shape; return it (H, W) and a crop -> bool function.

    bool: as is; uint8: > 127 (a 0/1 uint8 mask, max <= 1, counts as > 0); other integers: > 0;
    float: > 0.5.
    """
    if not isinstance(mask, np.ndarray):
        raise FineMaskError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2 or mask.shape != tuple(shape):
        raise FineMaskError(f"mask shape {mask.shape} does not match the image size {tuple(shape)}")
    kind = mask.dtype.kind
    if kind == "b":
        return mask, lambda a: a
    if mask.dtype == np.uint8:
        if int(mask.max()) <= 1:
            return mask, lambda a: a > 0
        return mask, lambda a: a > 127
    if kind in "iu":
        return mask, lambda a: a > 0
    if kind == "f":
        return mask, lambda a: a > 0.5
    raise FineMaskError(f"mask must be bool, uint8 (0/255) or float, got dtype {mask.dtype}")


def global_size(height: int, width: int, L: int) -> tuple[int, int]:
    """Size (gh, gw) of the global step: longest side exactly ``L``, aspect ratio kept."""
    scale = L / max(height, width)
    gh = L if height >= width else max(1, math.floor(height * scale + 1e-6))
    gw = L if width > height else max(1, math.floor(width * scale + 1e-6))
    return gh, gw


def _pad8(x: torch.Tensor, value: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


# --------------------------------------------------------------------------------------------


class Refiner:
    """Runs a ``RefinementModule`` over images of any size; see the module docstring.

    ``device``: ``"cpu"``, ``"cuda"``, or None for CUDA when available. ``selection``: default
    tile selection. ``max_batch``: upper bound of the adaptive tile batch (default 16 on CUDA,
    1 on CPU, where a batch of 2 ran no faster and used more memory). ``reuse_cpu_memory``: see
    ``engine.tiling.reuse_freed_memory``. ``precision``: ``"float32"``, ``"bfloat16"`` or
    ``"auto"`` (bfloat16 on CUDA - autocast - and on CPUs with native bf16 arithmetic, where it
    doubles convolution speed; float32 elsewhere). ``num_threads``: torch CPU threads while refining
    (process-wide for the duration of a call; None keeps torch's setting). On a machine whose
    cores are busy with other work, 1 thread can be 2-3x faster than 2 (threads of one operation
    wait for each other when one of them is descheduled); see docs/BENCHMARKS.md.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None,
                 card: ModelCard | None = None, selection: str = "cover", max_batch: int | None = None,
                 reuse_cpu_memory: bool = True, num_threads: int | None = None, precision: str = "auto"):
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.eval()
        if precision == "auto":
            precision = "bfloat16" if self.device.type == "cuda" or cpu_has_bf16() else "float32"
        self.precision = precision
        self._inference: tuple[tuple[int, ...], nn.Module] | None = None
        self.card = card
        self.selection = selection
        self.max_batch = max_batch or (16 if self.device.type == "cuda" else 1)
        self.reuse_cpu_memory = reuse_cpu_memory
        self.num_threads = num_threads
        self.stats = RefineStats()
        self._bytes_per_pixel: float | None = None

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> Refiner:
        """Load a FineMask refinement checkpoint (a shipped name or a folder)."""
        state, card = load_checkpoint(name_or_path)
        path = Path(str(name_or_path))
        if card.architecture != ARCHITECTURE:
            raise FineMaskError(f"this model is a {card.architecture!r} model, not a refinement "
                                f"({ARCHITECTURE!r}) model", path)
        # Build on the meta device first: a config that cannot be built, or tensors that do not
        # fit it, are refused before any memory is allocated for the module.
        try:
            with torch.device("meta"):
                probe = build_refinement_module(card.config)
        except Exception as exc:  # any failure of an untrusted config is the card's problem
            raise FineMaskError(f"model card has an unusable config ({exc})", path) from None
        _check_state(probe.state_dict(), state, path)
        model = build_refinement_module(card.config)
        _load_state(model, state, path)
        return cls(model, card=card, **kwargs)

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, *, save_to: str | Path | None = None,
                                 name: str = "cascadepsp-official", overwrite: bool = False,
                                 **kwargs: Any) -> Refiner:
        """Load the official CascadePSP weights (the ``model`` file of its release).

        The file is read with ``torch.load(weights_only=True)``, which refuses anything but
        tensors and containers. ``module.`` prefixes (DataParallel) are removed. With ``save_to``,
        the weights are also written as a FineMask checkpoint folder (safetensors + card).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FineMaskError("official CascadePSP checkpoint not found", path)
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise FineMaskError(f"not a loadable PyTorch weights file ({type(exc).__name__}: {exc})", path) from None
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise FineMaskError("file does not hold a state dict of tensors", path)
        state = {k.removeprefix("module."): v for k, v in raw.items()}
        config = RefinerConfig(backbone="resnet50")
        model = RefinementModule(config)
        _load_state(model, state, path)
        card = ModelCard(name=name, task="refinement", architecture=ARCHITECTURE, config=config.to_dict(),
                         training={"source": "official CascadePSP release weights (hkchengrex/CascadePSP)",
                                   "file": path.name})
        if save_to is not None:
            save_checkpoint(save_to, model.state_dict(), card, overwrite=overwrite)
        return cls(model, card=card, **kwargs)

    def save(self, folder: str | Path, *, name: str, overwrite: bool = False, half: bool = False,
             **card_fields: Any) -> Path:
        """Write the model as a FineMask checkpoint folder; ``card_fields`` go to the card."""
        config = getattr(self.model, "config", None)
        if not isinstance(config, RefinerConfig):
            raise FineMaskError("only RefinementModule models can be saved as checkpoints")
        card = ModelCard(name=name, task="refinement", architecture=ARCHITECTURE, config=config.to_dict(),
                         **card_fields)
        return save_checkpoint(folder, self.model.state_dict(), card, half=half, overwrite=overwrite)

    # ---------------------------------------------------------------- public API

    def refine(self, image: np.ndarray, mask: np.ndarray, fast: bool = False, L: int = 900,
               on_progress: ProgressFn | None = None, cancel: CancelFn | None = None, *,
               selection: str | None = None, batch_size: int | None = None,
               skip_global: bool = False) -> np.ndarray:
        """Refine ``mask`` on ``image``; return float32 (H, W) foreground confidence in [0, 1].

        image: (H, W, 3) uint8, uint16 or float in [0, 1] (gray and RGBA are accepted too).
        mask: (H, W) bool, uint8 0/255 (or 0/1), or float (thresholded at 0.5).
        ``L``: working size of the global step and tile size of the local step (pixels).
        ``batch_size``: fixed tile batch (default: adaptive). ``skip_global``: local step only,
        starting from ``mask`` (see the module docstring). Raises ``RefinementCancelled``.
        """
        image = _check_image(image)
        mask, binarise = _mask_binariser(mask, image.shape[:2])
        selection = selection or self.selection
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if L < 96:  # tiles need L/2 > 2 * 16 px margins (and the network some context)
            raise ValueError(f"L must be at least 96, got {L}")
        if fast and skip_global:
            raise ValueError("fast (global step only) and skip_global (local step only) exclude each other")
        self.stats = RefineStats(selection=selection)
        H, W = image.shape[:2]
        gh, gw = (min(L, H), min(L, W)) if skip_global else global_size(H, W, L)
        # Memory guard: full-size result, overlap count and binarised mask (float32 + 2 x uint8),
        # and one L x L tile (the global step runs the same network on gh x gw); lowers the tile
        # batch or refuses.
        batch_size = self.adaptive_batch_size(
            max(gh, min(L, H)), max(gw, min(L, W)), fixed_bytes=6 * H * W, wanted=batch_size,
            what=f"refining a {W}x{H} image")
        with torch.inference_mode(), _threads(self.num_threads), \
                reuse_freed_memory(self.reuse_cpu_memory and self.device.type == "cpu"):
            _check_cancel(cancel)
            if on_progress:
                on_progress(0, 1, "reading the mask" if skip_global else "global step")
            t0 = time.perf_counter()
            glob = coarse_as_global(mask, binarise) if skip_global else self.global_step(image, mask, binarise, L)
            self.stats.global_seconds = time.perf_counter() - t0
            if fast:
                if on_progress:
                    on_progress(1, 1, "done")
                return self.upsample_global(glob)
            t0 = time.perf_counter()
            out = self.local_step(image, glob, L, selection=selection, batch_size=batch_size,
                                  on_progress=on_progress, cancel=cancel)
            self.stats.local_seconds = time.perf_counter() - t0
        return out

    def refine_labels(self, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None, *,
                      fast: bool = False, L: int = 900, ignore_index: int | None = None,
                      on_progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                      selection: str | None = None, batch_size: int | None = None,
                      skip_global: bool = False,
                      return_confidence: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Refine a label map class by class; return labels like ``labels`` (same dtype).

        With ``return_confidence``, return (labels, confidence) where confidence is float32
        (H, W): the winning class's refined confidence (or the coarse one where it held).

        Each class present in ``labels`` (except ``ignore_index``) is refined as a binary mask
        inside its bounding box enlarged by 25% (12.5% per side, at least 8 px); a pixel goes to
        the class with the highest refined confidence if that beats the confidence of its coarse
        label: ``probs[label]`` when class probabilities ``probs`` (C, H, W) are given, else 0.5
        as in the reference. Classes absent from ``labels`` never appear. With exactly two
        classes, only the smaller one is refined and the other is its complement.
        """
        image = _check_image(image)
        if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.shape != image.shape[:2]:
            raise FineMaskError(f"labels must be an (H, W) array matching the image size {image.shape[:2]}, "
                                f"got {getattr(labels, 'shape', None)}")
        if labels.dtype.kind not in "iub":
            raise FineMaskError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        if probs is not None and (probs.ndim != 3 or probs.shape[1:] != labels.shape):
            raise FineMaskError(f"probs must be (C, H, W) with (H, W) = {labels.shape}, got {probs.shape}")
        H, W = labels.shape

        def guard(boxes: dict[int, tuple[int, int, int, int]]) -> None:
            # Memory guard, before any work: the result labels and best confidence (full size), and
            # the largest class box's refinement (result + count + its confidence map) with one tile.
            box_area = max((y1 - y0) * (x1 - x0) for (y0, y1, x0, x1) in boxes.values())
            self.adaptive_batch_size(min(L, H), min(L, W), wanted=1, what=f"refining a {W}x{H} label map",
                                     fixed_bytes=H * W * (labels.itemsize + 5) + 9 * box_area)

        kwargs = {"fast": fast, "L": L, "cancel": cancel, "selection": selection, "batch_size": batch_size,
                  "skip_global": skip_global}
        return arbitrate_classes(
            labels, probs,
            lambda box, mask, progress: self.refine(image[box[0]:box[1], box[2]:box[3]], mask,
                                                    on_progress=progress, **kwargs),
            ignore_index=ignore_index, on_progress=on_progress, before_work=guard,
            return_confidence=return_confidence)

    # ---------------------------------------------------------------- the two steps

    @torch.inference_mode()
    def global_step(self, image: np.ndarray, mask: np.ndarray, binarise: Callable[[np.ndarray], np.ndarray],
                    L: int) -> GlobalResult:
        """Three cascade passes on the image resized so its longest side is ``L``."""
        H, W = image.shape[:2]
        gh, gw = global_size(H, W, L)
        if max(H, W) > L:
            rgb = torch.from_numpy(area_resize(image, gh, gw, convert=_unit_rgb))
            seg = torch.from_numpy(area_resize(mask, gh, gw, convert=lambda a: binarise(a).astype(np.float64)))
            rgb, seg = rgb.permute(2, 0, 1)[None], seg[None, None]
            img = normalise_image(rgb.to(self.device))
            seg = seg.to(self.device) * 2 - 1
        else:
            img = normalise_image(torch.from_numpy(_unit_rgb(image)).permute(2, 0, 1)[None].to(self.device))
            seg = torch.from_numpy(binarise(mask).astype(np.float32))[None, None].to(self.device) * 2 - 1
            if (gh, gw) != (H, W):
                img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
                seg = F.interpolate(seg, size=(gh, gw), mode="bilinear", align_corners=False)
        out = self._forward(img, seg)
        os1 = torch.sigmoid(out["pass3_os1"][0, 0, :gh, :gw].float()).cpu()
        os4 = torch.sigmoid(out["pass3_os4"][0, 0, :gh, :gw].float()).cpu()
        return GlobalResult(os1=os1, os4=os4, full_shape=(H, W))

    @torch.inference_mode()
    def local_step(self, image: np.ndarray, glob: GlobalResult, L: int, *, selection: str = "cover",
                   batch_size: int | None = None, on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> np.ndarray:
        """Passes 2 and 3 on full-resolution tiles, blended into a float32 (H, W) map."""
        H, W = glob.full_shape
        tiles = tile_grid(H, W, L, margin=TILE_MARGIN)
        chosen = select_tiles(tiles, glob, selection, core_margin=L // 8)
        self.stats.tiles_total, self.stats.tiles_processed = len(tiles), len(chosen)
        self.stats.processed = chosen
        th, tw = min(L, H), min(L, W)
        bs = batch_size or self.adaptive_batch_size(th, tw)
        self.stats.batch_size = bs
        acc = TileAccumulator(H, W, max_overlap(tiles))
        total = len(chosen) + 1
        if on_progress:
            on_progress(1, total, f"local step: {len(chosen)} of {len(tiles)} tiles")
        for b0 in range(0, len(chosen), bs):
            _check_cancel(cancel)
            batch = chosen[b0:b0 + bs]
            for t, p in zip(batch, self.predict_tiles(image, glob, batch)):
                acc.add(t, p)
            if on_progress:
                on_progress(1 + b0 + len(batch), total, "local step")
        return acc.finish(fallback=glob.full_rows)

    @torch.inference_mode()
    def predict_tiles(self, image: Any, glob: GlobalResult, tiles: list[Tile]) -> np.ndarray:
        """Passes 2 and 3 on one batch of full-resolution tiles; float32 (n, th, tw) in [0, 1].

        ``image`` only needs ``image[rows, cols]`` slicing that returns an (h, w, 3) array (a
        numpy array, a memory-mapped TIFF, a zarr array), so tiles of a huge image can be read
        and run anywhere (``engine.batch`` spreads them over a Dask cluster).
        """
        th, tw = tiles[0].y1 - tiles[0].y0, tiles[0].x1 - tiles[0].x0
        img = torch.stack([torch.from_numpy(_unit_rgb(np.asarray(image[t.crop]))).permute(2, 0, 1)
                           for t in tiles])
        seg = torch.stack([(glob.region(t, "os1") > 0.5).float() * 2 - 1 for t in tiles])[:, None]
        prev = torch.stack([glob.region(t, "os4") * 2 - 1 for t in tiles])[:, None]
        img = normalise_image(img.to(self.device))
        out = self._forward(img, seg.to(self.device), prev.to(self.device))
        return torch.sigmoid(out["pass3_os1"][:, 0, :th, :tw].float()).cpu().numpy()

    # ---------------------------------------------------------------- helpers

    @property
    def inference_model(self) -> nn.Module:
        """The module as run: BatchNorms folded (``fuse_for_inference``), channels_last, on the
        device, in bfloat16 for CPU bf16 precision. Rebuilt when ``model``'s tensors change."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        version = tuple(t._version for t in tensors) + tuple(id(t) for t in tensors)
        if self._inference is None or self._inference[0] != version:
            m = fuse_for_inference(self.model) if isinstance(self.model, RefinementModule) else self.model
            dtype = self._dtype if self.device.type == "cpu" else torch.float32
            m = m.eval().to(self.device, dtype=dtype, memory_format=torch.channels_last)
            self._inference = (version, m)
        return self._inference[1]

    @property
    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float32

    def _forward(self, img: torch.Tensor, seg: torch.Tensor, prev_os8: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """Pad to a multiple of 8 (image 0, masks -1, as the reference) and run the module."""
        model = self.inference_model
        cl = torch.channels_last
        dtype = self._dtype if self.device.type == "cpu" else torch.float32
        img = _pad8(img, 0.0).to(dtype).contiguous(memory_format=cl)
        seg = _pad8(seg, -1.0).to(dtype).contiguous(memory_format=cl)
        if prev_os8 is not None:
            prev_os8 = _pad8(prev_os8, -1.0).to(dtype).contiguous(memory_format=cl)
        cuda_bf16 = self.device.type == "cuda" and self.precision == "bfloat16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda_bf16):
            return model(img, seg, prev_os8)

    def upsample_global(self, glob: GlobalResult) -> np.ndarray:
        """The global step's confidence at full size (what ``fast=True`` returns)."""
        H, W = glob.full_shape
        gh, gw = glob.os1.shape
        if gh > H or gw > W:  # the image was enlarged for the global step: shrink back by area
            return area_resize(glob.os1.numpy(), H, W)
        out = np.empty((H, W), np.float32)
        for r0 in range(0, H, STRIP_ROWS):
            out[r0:r0 + STRIP_ROWS] = glob.full_rows(r0, min(H, r0 + STRIP_ROWS))
        return out

    def tile_bytes(self, th: int, tw: int) -> int:
        """Estimated working memory of one (th, tw) tile through passes 2 and 3, in bytes."""
        if self._bytes_per_pixel is None:
            dtype = self._dtype if self.device.type == "cpu" else torch.float32
            x = torch.zeros(1, 3, 64, 64, device=self.device, dtype=dtype)
            s = torch.zeros_like(x[:, :1])
            self._bytes_per_pixel = activation_bytes_per_pixel(self.inference_model, x, s, s)
        return int(self._bytes_per_pixel * (th + 8) * (tw + 8))

    def adaptive_batch_size(self, th: int, tw: int, *, fixed_bytes: int = 0, wanted: int | None = None,
                            what: str = "refinement") -> int:
        """Tiles per batch that fit in free memory next to ``fixed_bytes`` of full-size buffers,
        1..``wanted`` (default ``max_batch``); raises ``MemoryBudgetError`` when one does not."""
        return plan_batch(fixed_bytes=fixed_bytes, item_bytes=self.tile_bytes(th, tw),
                          wanted=wanted or self.max_batch, device=self.device, what=what, unit="tile",
                          hint="try fast mode, a smaller L, or a smaller image")



#: ``refine_box(box, mask, on_progress) -> float32 confidence of the box`` for one class.
RefineBoxFn = Callable[[tuple[int, int, int, int], np.ndarray, "ProgressFn | None"], np.ndarray]


def arbitrate_classes(labels: np.ndarray, probs: Any, refine_box: RefineBoxFn, *, ignore_index: int | None = None,
                      on_progress: ProgressFn | None = None,
                      before_work: Callable[[dict[int, tuple[int, int, int, int]]], None] | None = None,
                      return_confidence: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The class loop of :meth:`Refiner.refine_labels`, with each class's refinement delegated.

    ``refine_box`` refines one class's binary mask inside its enlarged box (in memory, or tile by
    tile on a cluster: ``engine.huge``). ``probs``: (C, H, W) indexable by row strips, or None.
    ``before_work(boxes)`` runs once the boxes are known (the memory guard).
    """
    counts = class_counts(labels)
    classes = [int(c) for c in np.flatnonzero(counts) if ignore_index is None or c != ignore_index]
    if probs is not None and classes and max(classes) >= probs.shape[0]:
        raise FineMaskError(f"labels contain class {max(classes)} but probs has {probs.shape[0]} classes")
    out = labels.copy()
    H, W = labels.shape
    if len(classes) < 2:
        return (out, np.ones((H, W), np.float32)) if return_confidence else out
    n = len(classes)
    has_ignored = ignore_index is not None and 0 <= ignore_index < len(counts) and counts[ignore_index] > 0
    two = n == 2 and not has_ignored
    boxes = enlarged_bboxes(labels, classes)
    if before_work is not None:
        before_work(boxes)

    def progress_for(k: int) -> ProgressFn | None:
        if on_progress is None:
            return None
        steps = 1 if two else n
        return lambda d, t, m: on_progress(k * 1000 + int(1000 * d / max(t, 1)), steps * 1000,
                                           f"class {classes[k]} ({k + 1}/{steps}): {m}")

    if two:
        small, big = sorted(classes, key=lambda c: (counts[c], c))
        (y0, y1, x0, x1) = boxes[small]
        conf = refine_box(boxes[small], labels[y0:y1, x0:x1] == small, progress_for(0))
        out[:] = big
        out[y0:y1, x0:x1] = np.where(conf > 0.5, small, big).astype(out.dtype)
        best = np.ones((H, W), np.float32)
        best[y0:y1, x0:x1] = np.maximum(conf, 1.0 - conf)
        return (out, best) if return_confidence else out
    if probs is not None:
        best = np.empty((H, W), np.float32)
        n_prob = probs.shape[0]
        for r0 in range(0, H, STRIP_ROWS):
            lab = labels[r0:r0 + STRIP_ROWS].astype(np.int64)
            coarse = np.take_along_axis(np.asarray(probs[:, r0:r0 + STRIP_ROWS]),
                                        np.minimum(lab, n_prob - 1)[None], 0)[0]
            best[r0:r0 + STRIP_ROWS] = np.where(lab < n_prob, coarse, 0.5)  # ignored pixels: 0.5
    else:
        best = np.full((H, W), 0.5, np.float32)
    for k, c in enumerate(classes):
        (y0, y1, x0, x1) = boxes[c]
        conf = refine_box(boxes[c], labels[y0:y1, x0:x1] == c, progress_for(k))
        region_best = best[y0:y1, x0:x1]
        wins = conf > region_best
        out[y0:y1, x0:x1][wins] = c
        np.copyto(region_best, conf, where=wins)
    return (out, best) if return_confidence else out


def coarse_as_global(mask: np.ndarray, binarise: Callable[[np.ndarray], np.ndarray]) -> GlobalResult:
    """The binarised coarse mask in place of a global result (``skip_global``): full size, uint8 0/1."""
    fg = torch.from_numpy(binarise(np.asarray(mask)).astype(np.uint8, copy=False))
    return GlobalResult(os1=fg, os4=fg, full_shape=tuple(fg.shape), origin=(0, 0))


def select_tiles(tiles: list[Tile], glob: GlobalResult, selection: str, core_margin: int = 112) -> list[Tile]:
    """Tiles the local step runs, in grid order; see the module docstring for ``selection``.

    Works on the thresholded global result (> 0.5) resized to full size, but resizes only tiles
    whose low-resolution neighbourhood is mixed: bilinear values are convex combinations of
    their sources, so a tile whose sources are all above (or all at/below) 0.5 is uniform.
    """
    if selection == "all":
        return list(tiles)
    H, W = glob.full_shape
    gh, gw = glob.os1.shape
    fg_low = glob.os1 > 0.5
    chosen: list[Tile] = []
    cells: dict[int, np.ndarray] = {}
    cell = 8
    ncols = -(-W // cell)
    for t in tiles:
        ya, yb = source_span(gh, H, t.y0, t.y1)
        xa, xb = source_span(gw, W, t.x0, t.x1)
        block = fg_low[ya:yb, xa:xb]
        if bool(block.all()) or not bool(block.any()):
            continue  # uniform tile: 0% or 100% foreground, no boundary
        fg = (glob.region(t, "os1") > 0.5).numpy()
        if selection == "fraction":
            frac = float(fg.mean())
            if FRACTION_RANGE[0] <= frac <= FRACTION_RANGE[1]:
                chosen.append(t)
            continue
        edge = _boundary_pixels(fg)
        ry, rx = t.written_in_tile
        if not edge[ry, rx].any():
            continue
        if selection == "boundary":
            chosen.append(t)
            continue
        cy0, cy1, cx0, cx1 = t.core(H, W, core_margin)
        ys, xs = np.nonzero(edge[cy0 - t.y0:cy1 - t.y0, cx0 - t.x0:cx1 - t.x0])
        cells[t.index] = np.unique(((ys + cy0) // cell) * ncols + (xs + cx0) // cell)
        chosen.append(t)
    if selection == "cover":
        chosen = _greedy_cover(chosen, cells)
    return chosen


def _boundary_pixels(fg: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other value (both sides of the boundary)."""
    edge = np.zeros_like(fg)
    dy = fg[1:] != fg[:-1]
    dx = fg[:, 1:] != fg[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _greedy_cover(candidates: list[Tile], cells: dict[int, np.ndarray]) -> list[Tile]:
    """Greedy set cover: repeatedly take the tile whose core covers most uncovered boundary cells."""
    if not candidates:
        return []
    universe = np.unique(np.concatenate([cells[t.index] for t in candidates]))
    members = {t.index: np.searchsorted(universe, cells[t.index]) for t in candidates}
    covered = np.zeros(len(universe), bool)
    picked: list[Tile] = []
    remaining = list(candidates)
    while not covered.all() and remaining:
        gains = [int((~covered[members[t.index]]).sum()) for t in remaining]
        k = int(np.argmax(gains))
        if gains[k] == 0:
            break
        t = remaining.pop(k)
        covered[members[t.index]] = True
        picked.append(t)
    return sorted(picked, key=lambda t: t.index)


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Pixel count per class value (bincount in row strips; labels are non-negative)."""
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if labels.size and int(labels.min()) < 0:
        raise FineMaskError("labels must be non-negative class indices")
    top = int(labels.max()) + 1 if labels.size else 1
    counts = np.zeros(top, np.int64)
    flat = labels.reshape(-1)
    for s in range(0, flat.size, 1 << 24):
        counts += np.bincount(flat[s:s + (1 << 24)], minlength=top)
    return counts


def enlarged_bboxes(labels: np.ndarray, classes: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """Per class, the bounding box (y0, y1, x0, x1) grown by 12.5% of its size per side (25% in
    all, as in the reference's multi-class evaluation), at least 8 px, clipped to the image.
    Computed in row strips (no full-size temporaries)."""
    H, W = labels.shape
    rows = {c: np.zeros(H, bool) for c in classes}
    cols = {c: np.zeros(W, bool) for c in classes}
    for r0 in range(0, H, STRIP_ROWS):
        strip = labels[r0:r0 + STRIP_ROWS]
        for c in classes:
            m = strip == c
            rows[c][r0:r0 + STRIP_ROWS] = m.any(axis=1)
            cols[c] |= m.any(axis=0)
    boxes = {}
    for c in classes:
        ry, cx = np.flatnonzero(rows[c]), np.flatnonzero(cols[c])
        y0, y1, x0, x1 = int(ry[0]), int(ry[-1]) + 1, int(cx[0]), int(cx[-1]) + 1
        gy, gx = max(8, round(0.125 * (y1 - y0))), max(8, round(0.125 * (x1 - x0)))
        boxes[c] = (max(0, y0 - gy), min(H, y1 + gy), max(0, x0 - gx), min(W, x1 + gx))
    return boxes


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_has_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _check_cancel(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("refinement cancelled")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with plain-words errors; BatchNorm step counters may be absent."""
    own = model.state_dict()
    _check_state(own, state, path)
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)


def _check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``FineMaskError`` unless ``state`` has the keys and shapes of ``own``."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise FineMaskError("weights do not fit the refinement module: " + "; ".join(parts), path)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise FineMaskError(f"weights have wrong shapes: {'; '.join(wrong[:3])}", path)
