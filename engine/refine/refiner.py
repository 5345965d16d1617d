"""``Refiner``: the cascade runtime (global step, local step over tiles, batching, precision)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import ModelCard, save_checkpoint
from ..errors import Cancelled, FineMaskError
from ..memory import reuse_freed_memory
from ..memory_guard import activation_bytes_per_pixel, plan_batch
from ..models.cascadepsp import RefinementModule, RefinerConfig, fuse_for_inference, normalise_image
from ..tiling import STRIP_ROWS, Tile, TileAccumulator, area_resize, max_overlap, tile_grid
from .classes import plan_classes
from .inputs import check_image, global_size, mask_binariser, pad8, unit_rgb
from .labels import refine_label_map
from .loading import ARCHITECTURE, load_module, load_official
from .results import GlobalResult, RefineStats, coarse_as_global, keep_unseen
from .selection import SELECTIONS, TILE_MARGIN, select_tiles

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]
#: ``run_batches(tile batches) -> one (n, th, tw) float32 prediction per batch, in order``.
BatchRunner = Callable[[list[list[Tile]]], Iterable[np.ndarray]]

PRECISIONS = ("auto", "float32", "bfloat16")

#: Kept as a name for old imports; refinement raises ``engine.errors.Cancelled``.
RefinementCancelled = Cancelled


class Refiner:
    """Runs a ``RefinementModule`` over images of any size; see the module docstring.

    ``device``: ``"cpu"``, ``"cuda"``, or None for CUDA when available. ``selection``: default
    tile selection. ``max_batch``: upper bound of the adaptive tile batch (default 16 on CUDA,
    1 on CPU, where a batch of 2 ran no faster and used more memory). ``reuse_cpu_memory``: see
    ``engine.memory.reuse_freed_memory``. ``precision``: ``"float32"``, ``"bfloat16"`` or
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
        """Load a FineMask refinement checkpoint (a shipped or installed name, or a folder)."""
        model, card = load_module(name_or_path)
        return cls(model, card=card, **kwargs)

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, *, save_to: str | Path | None = None,
                                 name: str = "cascadepsp-official", overwrite: bool = False,
                                 **kwargs: Any) -> Refiner:
        """Load the official CascadePSP weights (``engine.refine.loading.load_official``)."""
        model, card = load_official(path, save_to=save_to, name=name, overwrite=overwrite)
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
        image = check_image(image)
        mask, binarise = mask_binariser(mask, image.shape[:2])
        selection = check_options(selection or self.selection, L, fast, skip_global)
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
                return keep_unseen(self.upsample_global(glob), mask, glob, binarise, fast=True)
            t0 = time.perf_counter()
            out = self.local_step(image, glob, L, selection=selection, batch_size=batch_size,
                                  on_progress=on_progress, cancel=cancel)
            self.stats.local_seconds = time.perf_counter() - t0
        return keep_unseen(out, mask, glob, binarise)

    def refine_labels(self, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None, *,
                      fast: bool = False, L: int = 900, ignore_index: int | None = None,
                      on_progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                      selection: str | None = None, batch_size: int | None = None,
                      skip_global: bool = False,
                      return_confidence: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Refine a label map; return labels like ``labels`` (same dtype).

        Every class but the largest is refined as a binary mask inside its enlarged bounding box;
        a pixel changes class only where its own class lets it go or, for the largest class,
        where another class claims it (``engine.refine.classes``). ``probs`` (C, H, W): the
        segmenter's class probabilities, used for pixels let go that no class claims. Classes
        absent from ``labels`` never appear; ``ignore_index`` pixels never change. With
        ``return_confidence``, also a float32 (H, W) confidence of the result.
        """
        image = check_image(image)
        if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.shape != image.shape[:2]:
            raise FineMaskError(f"labels must be an (H, W) array matching the image size {image.shape[:2]}, "
                                f"got {getattr(labels, 'shape', None)}")
        if labels.dtype.kind not in "iub":
            raise FineMaskError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        if probs is not None and (probs.ndim != 3 or probs.shape[1:] != labels.shape):
            raise FineMaskError(f"probs must be (C, H, W) with (H, W) = {labels.shape}, got {probs.shape}")
        H, W = labels.shape

        plan = plan_classes(labels, ignore_index)
        if probs is not None and plan.classes and max(plan.classes) >= probs.shape[0]:
            raise FineMaskError(f"labels contain class {max(plan.classes)} but probs has {probs.shape[0]} classes")
        if not plan.refined:
            out = labels.copy()
            return (out, np.ones((H, W), np.float32)) if return_confidence else out
        selection = check_options(selection or self.selection, L, fast, skip_global)
        # Memory guard, before any work: the result labels and the arbitration's three maps (full
        # size), every refined class's accumulator (sum + count) and mask, and one tile batch.
        boxes = sum((y1 - y0) * (x1 - x0) for (y0, y1, x0, x1) in (plan.boxes[c] for c in plan.refined))
        batch_size = self.adaptive_batch_size(min(L, H), min(L, W), wanted=batch_size,
                                              what=f"refining a {W}x{H} label map",
                                              fixed_bytes=H * W * (labels.itemsize + 10) + 6 * boxes)
        self.stats = RefineStats(selection=selection)
        with torch.inference_mode(), _threads(self.num_threads), \
                reuse_freed_memory(self.reuse_cpu_memory and self.device.type == "cpu"):
            return refine_label_map(self, image, labels, probs, plan, fast=fast, L=L, selection=selection,
                                    batch_size=batch_size, skip_global=skip_global, on_progress=on_progress,
                                    cancel=cancel, return_confidence=return_confidence)

    # ---------------------------------------------------------------- the two steps

    @torch.inference_mode()
    def global_image(self, image: Any, L: int) -> torch.Tensor:
        """The global step's image input: resized so its longest side is ``L``, normalised,
        (1, 3, gh, gw) on the device (area averaging when shrinking, bicubic when enlarging)."""
        H, W = image.shape[:2]
        gh, gw = global_size(H, W, L)
        if max(H, W) > L:
            rgb = torch.from_numpy(area_resize(image, gh, gw, convert=unit_rgb)).permute(2, 0, 1)[None]
            return normalise_image(rgb.to(self.device))
        img = normalise_image(torch.from_numpy(unit_rgb(np.asarray(image))).permute(2, 0, 1)[None].to(self.device))
        if (gh, gw) != (H, W):
            img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
        return img

    @torch.inference_mode()
    def global_step(self, image: Any, mask: np.ndarray, binarise: Callable[[np.ndarray], np.ndarray],
                    L: int, *, img: torch.Tensor | None = None) -> GlobalResult:
        """Three cascade passes on the image resized so its longest side is ``L``.

        ``img``: ``global_image(image, L)`` when already computed (classes sharing a box)."""
        H, W = image.shape[:2]
        gh, gw = global_size(H, W, L)
        if img is None:
            img = self.global_image(image, L)
        if max(H, W) > L:
            cover = torch.from_numpy(area_resize(mask, gh, gw, convert=lambda a: binarise(a).astype(np.float64)))
        else:
            cover = torch.from_numpy(binarise(mask).astype(np.float32))
            if (gh, gw) != (H, W):
                cover = F.interpolate(cover[None, None], size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
        cover = cover.float()
        out = self._forward(img, cover[None, None].to(self.device) * 2 - 1)
        os1 = torch.sigmoid(out["pass3_os1"][0, 0, :gh, :gw].float()).cpu()
        os4 = torch.sigmoid(out["pass3_os4"][0, 0, :gh, :gw].float()).cpu()
        return GlobalResult(os1=os1, os4=os4, full_shape=(H, W), seen=cover)

    @torch.inference_mode()
    def local_step(self, image: Any, glob: GlobalResult, L: int, *, selection: str = "cover",
                   batch_size: int | None = None, on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, run_batches: BatchRunner | None = None) -> np.ndarray:
        """Passes 2 and 3 on full-resolution tiles, blended into a float32 (H, W) map.

        ``run_batches(batches) -> one (n, th, tw) prediction per batch, in order`` runs the tile
        batches somewhere else (``engine.batch`` sends them to a Dask cluster); by default they run
        here with ``predict_tiles``. Batches are blended in grid order either way, so the result
        is the same for the same ``batch_size``.
        """
        H, W = glob.full_shape
        tiles = tile_grid(H, W, L, margin=TILE_MARGIN)
        chosen = select_tiles(tiles, glob, selection, core_margin=L // 8)
        self.stats.tiles_total, self.stats.tiles_processed = len(tiles), len(chosen)
        self.stats.processed = chosen
        th, tw = min(L, H), min(L, W)
        bs = batch_size or self.adaptive_batch_size(th, tw)
        self.stats.batch_size = bs
        batches = [chosen[b:b + bs] for b in range(0, len(chosen), bs)]
        if run_batches is None:
            results: Iterator[np.ndarray] = (self.predict_tiles(image, glob, batch) for batch in batches)
        else:
            results = iter(run_batches(batches))
        acc = TileAccumulator(H, W, max_overlap(tiles))
        total = len(chosen) + 1
        if on_progress:
            on_progress(1, total, f"local step: {len(chosen)} of {len(tiles)} tiles")
        done = 0
        try:
            for batch in batches:
                _check_cancel(cancel)
                for t, p in zip(batch, next(results)):
                    acc.add(t, p)
                done += len(batch)
                if on_progress:
                    on_progress(1 + done, total, "local step")
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        return acc.finish(fallback=glob.full_rows)

    @torch.inference_mode()
    def predict_tiles(self, image: Any, glob: GlobalResult, tiles: list[Tile]) -> np.ndarray:
        """Passes 2 and 3 on one batch of full-resolution tiles; float32 (n, th, tw) in [0, 1].

        ``image`` only needs ``image[rows, cols]`` slicing that returns an (h, w, 3) array (a
        numpy array, a memory-mapped TIFF, a zarr array), so tiles of a huge image can be read
        and run anywhere (``engine.batch`` spreads them over a Dask cluster).
        """
        preds = []
        for t in tiles:  # one forward per batch; image crops normalised one at a time
            crop = torch.from_numpy(unit_rgb(np.asarray(image[t.crop]))).permute(2, 0, 1)[None]
            preds.append(normalise_image(crop.to(self.device)))
        return self.predict_regions(torch.cat(preds), [glob] * len(tiles), tiles)

    @torch.inference_mode()
    def predict_regions(self, crops: torch.Tensor, globs: list[GlobalResult], tiles: list[Tile]) -> np.ndarray:
        """Passes 2 and 3 on normalised image crops (n or 1, 3, th, tw): tile ``i`` takes its mask
        and OS8 estimate from ``globs[i]``; float32 (n, th, tw) in [0, 1]."""
        th, tw = tiles[0].y1 - tiles[0].y0, tiles[0].x1 - tiles[0].x0
        seg = torch.stack([(g.region(t, "os1") > 0.5).float() * 2 - 1 for g, t in zip(globs, tiles)])[:, None]
        prev = torch.stack([g.region(t, "os4") * 2 - 1 for g, t in zip(globs, tiles)])[:, None]
        img = crops.expand(len(tiles), -1, -1, -1)
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
        img = pad8(img, 0.0).to(dtype).contiguous(memory_format=cl)
        seg = pad8(seg, -1.0).to(dtype).contiguous(memory_format=cl)
        if prev_os8 is not None:
            prev_os8 = pad8(prev_os8, -1.0).to(dtype).contiguous(memory_format=cl)
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


def check_options(selection: str, L: int, fast: bool, skip_global: bool) -> str:
    """``selection`` once the options of a refinement are checked (ValueError otherwise)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if L < 96:  # tiles need L/2 > 2 * 16 px margins (and the network some context)
        raise ValueError(f"L must be at least 96, got {L}")
    if fast and skip_global:
        raise ValueError("fast (global step only) and skip_global (local step only) exclude each other")
    return selection


def _check_cancel(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("refinement cancelled")
