"""What runs on the workers: the per-process models and one task per image (or per tile batch).

Models come from the per-process cache every front end uses (``engine.model_cache``; each Dask
worker is a process). Tasks never raise for a bad image: the error is the summary row.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FineMaskError
from ..huge import ZARR_SUFFIX, Box, LazyImage, crop_of
from ..io import image_from_array, read_image, write_labels
from ..model_cache import shared_models
from ..pipeline import refine_mode, segment_image
from ..refine import GlobalResult
from ..tiling import Tile
from .config import BatchConfig
from .summary import summary_row

if TYPE_CHECKING:
    from ..refine import Refiner
    from ..segment import Segmenter


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model ("segmenter:<ref>", "refiner:<ref>")."""
    return dict(shared_models().loads)


def worker_device(config: BatchConfig, worker: Any = None) -> str:
    """This worker's device: the configured one, else its own GPU on a local cluster (worker
    ``i`` takes GPU ``i mod n``), any GPU elsewhere, or the CPU."""
    if config.device:
        return config.device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    if worker is None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            worker = get_worker()
    name = getattr(worker, "name", None)
    if isinstance(name, int) and n > 1:
        return f"cuda:{name % n}"
    return "cuda"


def worker_segmenter(config: BatchConfig, worker: Any = None) -> Segmenter:
    """This process's segmenter (loaded once)."""
    return shared_models().segmenter(config.model, device=worker_device(config, worker))


def worker_refiner(config: BatchConfig, worker: Any = None) -> Refiner | None:
    """This process's refiner (loaded once), or None when the batch does not refine."""
    if config.refiner is None:
        return None
    return shared_models().refiner(config.refiner, device=worker_device(config, worker), precision=config.precision)


def preload_models(config: BatchConfig, dask_worker: Any = None) -> str:
    """Load the models into this worker's cache (``client.run`` passes ``dask_worker``); return
    the device it runs on."""
    worker_segmenter(config, dask_worker)
    worker_refiner(config, dask_worker)
    return worker_device(config, dask_worker)


def error_text(exc: BaseException, source: str | Path) -> str:
    """The summary's error text of an exception raised for ``source``."""
    if isinstance(exc, FineMaskError):
        return str(exc)
    return f"{source}: {type(exc).__name__}: {exc}"


def load_source(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an input whole as float32 RGB (H, W, 3) in [0, 1] (files and ``.zarr`` folders)."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX and path.is_dir():
        with LazyImage(path, max_pixels=max_pixels) as img:
            return image_from_array(img[:, :], path)
    return read_image(path, max_pixels=max_pixels)


def process_image(source: str, output: str, config: BatchConfig) -> dict[str, Any]:
    """Segment (and refine) one image read whole and write its labels; return its summary row.

    The same per-image pipeline (``engine.pipeline``) as ``finemask segment [--refine]``."""
    t0 = time.perf_counter()
    try:
        segmenter, refiner = worker_segmenter(config), worker_refiner(config)
        image = load_source(source, config.max_pixels)
        labels = segment_image(segmenter, image, working_size=config.working_size, refiner=refiner,
                               mode=refine_mode(config.fast, config.skip_global), L=config.L,
                               selection=config.selection, tile_batch=config.tile_batch).labels
        del image
        write_labels(output, labels, palette=segmenter.palette)
        return summary_row(Path(source).name, "done", seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a bad image must not take the batch down
        return summary_row(Path(source).name, "failed", error_text(exc, source), time.perf_counter() - t0)


def segment_huge(source: str, config: BatchConfig) -> tuple[np.ndarray, list[list[int]]]:
    """Segment a huge image at working size, reading it in row strips: (low-resolution class
    probabilities (C, h, w) float32, palette)."""
    from ..huge import segment_lazy

    segmenter = worker_segmenter(config)
    with LazyImage(source, max_pixels=config.huge_max_pixels) as img:
        coarse = segment_lazy(segmenter, img, config.working_size)
    return coarse.low.numpy(), segmenter.palette


def predict_tile_batch(source: str, box: Box, glob: GlobalResult, tiles: list[Tile],
                       config: BatchConfig) -> np.ndarray:
    """One local-step batch of a huge image: the tiles' crops are read from the file here."""
    refiner = worker_refiner(config)
    with LazyImage(source, max_pixels=config.huge_max_pixels) as img:
        return refiner.predict_tiles(crop_of(img, box), glob, tiles)


def identity(x: Any) -> Any:
    """``x`` (a task that makes a value a future the scheduler can recompute)."""
    return x


def worker_info(config: BatchConfig, dask_worker: Any = None) -> dict[str, Any]:
    """Whether a worker runs on a GPU, and its thread count (``client.run`` passes ``dask_worker``)."""
    return {"cuda": worker_device(config, dask_worker) != "cpu", "threads": int(dask_worker.state.nthreads)}
