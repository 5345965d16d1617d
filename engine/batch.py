"""Segment (and refine) every image in a folder on a Dask cluster (``dask.distributed``).

``run_batch(input_dir, output_dir, config)`` writes ``output_dir/<stem>.tif`` (class labels,
uint8/uint16 TIFF) per image and ``output_dir/summary.csv`` (file, status, error, seconds):

- one task per image, run where the scheduler puts it; each worker process loads the models once
  (a per-process cache, filled on every worker before the first image, so a model that does not
  load is one clear error instead of one per image); on CUDA machines the local cluster has a
  worker per GPU and each worker uses its own;
- resumable: an image whose output exists and is a readable labels file of the image's size is
  skipped; outputs are written atomically, so a killed worker leaves no half-written file (its
  stray temporary file is removed at the end) and its images are run again elsewhere;
- a bad image is a ``failed`` row naming the file and its problem; the others go on;
- huge images (``BatchConfig.huge_pixels``; TIFF or ``.zarr`` folders) are read in parts
  (``engine.huge``): a worker segments the image shrunk in row strips, this process builds the
  full-size labels strip by strip and runs the refiner's global step, and the local step's tile
  batches run as tasks that read their own crops from the file. Results equal
  ``Refiner.refine_labels`` on one machine for the same tile batch size.

With ``client=None`` and ``scheduler=None`` a ``LocalCluster`` sized to this machine is started and
stopped. Input and output folders must be visible to every worker under the same paths.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from .atomic import atomic_write_text
from .checkpoints import resolve
from .errors import Cancelled, FineMaskError
from .huge import (
    HUGE_MAX_PIXELS,
    HUGE_PIXELS,
    ZARR_SUFFIX,
    Box,
    CoarseSegmentation,
    LazyImage,
    crop_of,
    is_lazy_readable,
    refine_labels_tiled,
)
from .io import IMAGE_SUFFIXES, image_from_array, image_shape, read_image, write_labels
from .model_cache import shared_models
from .pipeline import refine_mode, segment_image
from .refine import SELECTIONS, GlobalResult
from .tiling import Tile

if TYPE_CHECKING:
    from .refine import Refiner
    from .segment import Segmenter

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = ("file", "status", "error", "seconds")
LABELS_SUFFIX = ".tif"
#: Memory a CPU worker is given when the local cluster is sized (models + one large image).
WORKER_MEMORY = 2 << 30


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
        return replace(self, model=_model_ref(self.model),
                       refiner=None if self.refiner is None else _model_ref(self.refiner))


@dataclass
class Job:
    """One input image and its output; ``error`` is set when it cannot be run at all."""

    source: Path
    output: Path
    error: str = ""

    @property
    def name(self) -> str:
        return self.source.name


@dataclass
class BatchSummary:
    """Outcome of ``run_batch``: one row per input (file, status, error, seconds)."""

    rows: list[dict[str, Any]]
    csv_path: Path
    cancelled: bool = False
    workers: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


# --------------------------------------------------------------------------------------------
# Planning.


def plan_jobs(input_dir: str | Path, output_dir: str | Path) -> list[Job]:
    """One job per image in ``input_dir`` (TIFF, PNG, JPEG, ``.zarr`` folders; hidden names
    skipped), sorted by name. Inputs sharing a stem would write the same output: all but the
    first get an error."""
    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    if not input_dir.is_dir():
        raise FineMaskError("input folder not found", input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FineMaskError("output path exists and is not a folder", output_dir)
    if output_dir.resolve() == input_dir.resolve():
        raise FineMaskError("output folder must differ from the input folder (outputs would replace inputs)",
                            output_dir)
    sources = sorted(p for p in input_dir.iterdir() if not p.name.startswith(".") and
                     ((p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) or
                      (p.is_dir() and p.suffix.lower() == ZARR_SUFFIX)))
    if not sources:
        raise FineMaskError("folder holds no images (.tif, .png, .jpg, .zarr)", input_dir)
    jobs, seen = [], {}
    for src in sources:
        out = output_dir / f"{src.stem}{LABELS_SUFFIX}"
        first = seen.setdefault(out.name, src.name)
        error = "" if first == src.name else f"{src}: same name as {first}; both would write {out.name}"
        jobs.append(Job(src, out, error))
    return jobs


def source_shape(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an input from its header (TIFF/PNG/JPEG) or metadata (zarr)."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        with LazyImage(path, max_pixels=max_pixels) as img:
            return img.height, img.width
    return image_shape(path, max_pixels=max_pixels)


def output_done(path: str | Path, shape: tuple[int, int]) -> bool:
    """Whether ``path`` is a finished labels file for an image of ``shape``: one page of
    uint8/uint16, the right size, every data segment inside the file, and (up to 16 Mpx) decodable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) != 1:
                return False
            page = tif.pages[0]
            if page.dtype not in (np.uint8, np.uint16) or tuple(page.shape) != tuple(shape):
                return False
            if any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
                return False
            if shape[0] * shape[1] <= 1 << 24:
                page.asarray()
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is "not done"
        return False


# --------------------------------------------------------------------------------------------
# Models: the per-process cache every front end uses (``engine.model_cache``; each Dask worker
# is a process).


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model ("segmenter:<ref>", "refiner:<ref>")."""
    return dict(shared_models().loads)


def _device(config: BatchConfig, worker: Any = None) -> str:
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


def _segmenter(config: BatchConfig, worker: Any = None) -> Segmenter:
    return shared_models().segmenter(config.model, device=_device(config, worker))


def _refiner(config: BatchConfig, worker: Any = None) -> Refiner | None:
    if config.refiner is None:
        return None
    return shared_models().refiner(config.refiner, device=_device(config, worker), precision=config.precision)


def _preload(config: BatchConfig, dask_worker: Any = None) -> str:
    """Load the models into this worker's cache (``client.run`` passes ``dask_worker``); return
    the device it runs on."""
    _segmenter(config, dask_worker)
    _refiner(config, dask_worker)
    return _device(config, dask_worker)


# --------------------------------------------------------------------------------------------
# Tasks (run on workers). They never raise for a bad image: the error is the row.


def _row(job_name: str, status: str, error: str = "", seconds: float = 0.0) -> dict[str, Any]:
    return {"file": job_name, "status": status, "error": error, "seconds": round(seconds, 3)}


def _error_text(exc: BaseException, source: str | Path) -> str:
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
        segmenter, refiner = _segmenter(config), _refiner(config)
        image = load_source(source, config.max_pixels)
        labels = segment_image(segmenter, image, working_size=config.working_size, refiner=refiner,
                               mode=refine_mode(config.fast, config.skip_global), L=config.L,
                               selection=config.selection, tile_batch=config.tile_batch).labels
        del image
        write_labels(output, labels, palette=segmenter.palette)
        return _row(Path(source).name, "done", seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a bad image must not take the batch down
        return _row(Path(source).name, "failed", _error_text(exc, source), time.perf_counter() - t0)


def segment_huge(source: str, config: BatchConfig) -> tuple[np.ndarray, list[list[int]]]:
    """Segment a huge image at working size, reading it in row strips: (low-resolution class
    probabilities (C, h, w) float32, palette)."""
    from .huge import segment_lazy

    segmenter = _segmenter(config)
    with LazyImage(source, max_pixels=config.huge_max_pixels) as img:
        coarse = segment_lazy(segmenter, img, config.working_size)
    return coarse.low.numpy(), segmenter.palette


def predict_tile_batch(source: str, box: Box, glob: GlobalResult, tiles: list[Tile],
                       config: BatchConfig) -> np.ndarray:
    """One local-step batch of a huge image: the tiles' crops are read from the file here."""
    refiner = _refiner(config)
    with LazyImage(source, max_pixels=config.huge_max_pixels) as img:
        return refiner.predict_tiles(crop_of(img, box), glob, tiles)


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------------------
# The cluster.


def local_cluster_size(n_workers: int | None = None, threads_per_worker: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster: a worker per GPU when there are GPUs,
    else cores // threads workers, at most one per ``WORKER_MEMORY`` of free memory."""
    from .tiling import available_memory

    threads = max(1, int(threads_per_worker or 1))
    if n_workers:
        return max(1, int(n_workers)), threads
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus:
        return gpus, threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    by_memory = max(1, available_memory("cpu") // WORKER_MEMORY)
    return max(1, min(cores // threads, by_memory)), threads


@contextlib.contextmanager
def open_client(scheduler: str | None = None, n_workers: int | None = None,
                threads_per_worker: int | None = None, timeout: float = 20.0) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` (an address), or to a new local
    cluster of worker processes (closed on exit)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise FineMaskError("batch processing needs dask.distributed (pip install 'finemask[distributed]')") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise FineMaskError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    workers, threads = local_cluster_size(n_workers, threads_per_worker)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        client.wait_for_workers(workers, timeout=120)
        yield client
    finally:
        client.close()
        cluster.close()


class _ClusterTiles:
    """``TileRunner`` on a cluster: tile batches as tasks, at most ``window`` in flight, results
    yielded in submission order so they blend in the same order as on one machine."""

    def __init__(self, client: Any, source: str, config: BatchConfig, window: int):
        self.client, self.source, self.config, self.window = client, source, config, max(1, window)

    def __call__(self, box: Box, glob: GlobalResult, batches: list[list[Tile]]) -> Iterator[np.ndarray]:
        # A reduced-size global result goes in a task's own spec (not client.scatter), so the
        # scheduler can recompute it if the worker holding it dies. A full-resolution one (the
        # coarse mask, skip_global) is too big to send whole: each batch gets its tiles' window.
        g = None if glob.origin is not None else self.client.submit(_identity, glob, pure=False)

        def submit(batch: list[Tile]) -> Any:
            part = g if g is not None else glob.window((min(t.y0 for t in batch), max(t.y1 for t in batch)),
                                                       (min(t.x0 for t in batch), max(t.x1 for t in batch)))
            return self.client.submit(predict_tile_batch, self.source, box, part, batch, self.config, pure=False)

        pending: deque = deque()
        todo = iter(batches)
        try:
            for batch in todo:
                pending.append(submit(batch))
                if len(pending) >= self.window:
                    break
            while pending:
                fut = pending.popleft()
                result = fut.result()
                fut.release()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                yield result
        finally:
            for fut in pending:
                fut.cancel()
            if g is not None:
                g.release()


def _run_huge(client: Any, job: Job, config: BatchConfig, tile_batch: int, window: int,
              on_message: Callable[[str], None], cancel: CancelFn | None) -> dict[str, Any]:
    """Segment and refine one huge image with the cluster; write its labels from this process."""
    import torch

    t0 = time.perf_counter()
    try:
        on_message(f"{job.name}: segmenting")
        low, palette = client.submit(segment_huge, str(job.source), config, pure=False).result()
        coarse = CoarseSegmentation(torch.from_numpy(low), source_shape(job.source, max_pixels=config.huge_max_pixels))
        labels = coarse.labels()
        if config.refiner is not None:
            refiner = _refiner(config)  # the global steps run here, on this process's copy

            def progress(done: int, total: int, message: str) -> None:
                on_message(f"{job.name}: {message}")

            with LazyImage(job.source, max_pixels=config.huge_max_pixels) as img:
                labels = refine_labels_tiled(
                    img, labels, coarse.probs(), refiner, L=config.L, fast=config.fast,
                    skip_global=config.skip_global, selection=config.selection, batch_size=tile_batch,
                    run_tiles=_ClusterTiles(client, str(job.source), config, window),
                    on_progress=progress, cancel=cancel)
        write_labels(job.output, labels, palette=palette)
        return _row(job.name, "done", seconds=time.perf_counter() - t0)
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad image does not stop the batch
        return _row(job.name, "failed", _error_text(exc, job.source), time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# The batch.


def run_batch(input_dir: str | Path, output_dir: str | Path, config: BatchConfig | None = None, *,
              client: Any = None, scheduler: str | None = None, n_workers: int | None = None,
              threads_per_worker: int | None = None, on_progress: ProgressFn | None = None,
              cancel: CancelFn | None = None) -> BatchSummary:
    """Segment (and refine) every image of ``input_dir`` into ``output_dir``; see the module doc.

    ``client``: an existing ``distributed.Client`` (left open); else ``scheduler`` (address of
    a running cluster); else a local cluster of ``n_workers`` x ``threads_per_worker`` (default:
    ``local_cluster_size``). ``on_progress(done, total, message)`` counts images; ``cancel()``
    returning True stops the batch (images not finished are ``cancelled`` rows). The summary CSV
    is written (atomically) even when the batch stops early (on an error: ``not run`` rows).
    """
    t_start = time.perf_counter()
    config = (config or BatchConfig()).checked()
    jobs = plan_jobs(input_dir, output_dir)
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    total = len(jobs)
    summary = BatchSummary(rows=[], csv_path=output_dir / SUMMARY_FILE)

    def record(row: dict[str, Any], message: str) -> None:
        rows[row["file"]] = row
        if on_progress is not None:
            on_progress(len(rows), total, message)

    def message(text: str) -> None:
        if on_progress is not None:
            on_progress(len(rows), total, text)

    todo: list[tuple[Job, tuple[int, int]]] = []
    unfinished = "not run"  # the status of images left when the batch stops on an error
    try:
        for job in jobs:
            if job.error:
                record(_row(job.name, "failed", job.error), f"{job.name}: failed")
                continue
            try:
                lazy = is_lazy_readable(job.source)
                shape = source_shape(job.source, max_pixels=config.huge_max_pixels if lazy else config.max_pixels)
            except FineMaskError as exc:
                record(_row(job.name, "failed", str(exc)), f"{job.name}: failed")
                continue
            if output_done(job.output, shape):
                record(_row(job.name, "skipped"), f"{job.name}: already done")
            else:
                todo.append((job, shape))
        if todo and not _cancelled(cancel):
            with contextlib.ExitStack() as stack:
                if client is None:
                    client = stack.enter_context(open_client(scheduler, n_workers, threads_per_worker))
                summary.workers = _prepare_workers(client, config)
                _run_jobs(client, todo, config, record, message, cancel)
        unfinished = "cancelled"  # returned normally: anything left was cancelled
    finally:
        for job in jobs:
            rows.setdefault(job.name, _row(job.name, unfinished))
        summary.rows = [rows[j.name] for j in jobs]
        summary.cancelled = any(r["status"] == "cancelled" for r in summary.rows)
        _remove_stray_temporaries(output_dir, jobs)
        write_summary(summary.csv_path, summary.rows)
        summary.seconds = time.perf_counter() - t_start
    return summary


def _cancelled(cancel: CancelFn | None) -> bool:
    return cancel is not None and bool(cancel())


def _prepare_workers(client: Any, config: BatchConfig) -> int:
    """Load the models on every worker now; return the number of workers."""
    devices = client.run(_preload, config)
    if not devices:
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, OSError):
            raise FineMaskError("the Dask cluster has no workers") from None
        devices = client.run(_preload, config)
    return len(devices)


def _run_jobs(client: Any, todo: list[tuple[Job, tuple[int, int]]], config: BatchConfig,
              record: Callable[[dict[str, Any], str], None], message: Callable[[str], None],
              cancel: CancelFn | None) -> None:
    from distributed import as_completed

    huge = [job for job, (h, w) in todo if h * w > config.huge_pixels and is_lazy_readable(job.source)]
    huge_names = {j.name for j in huge}
    whole = [job for job, _ in todo if job.name not in huge_names]
    futures = {client.submit(process_image, str(j.source), str(j.output), config, pure=False): j for j in whole}
    pending = as_completed(futures)
    try:
        while not pending.is_empty():
            if _cancelled(cancel):
                return
            ready = pending.next_batch(block=False) if pending.has_ready() else []
            if not ready:
                time.sleep(0.05)
                continue
            for fut in ready:
                job = futures[fut]
                if fut.status == "finished":
                    row = fut.result()
                else:  # e.g. KilledWorker: the image took down workers more than allowed
                    row = _row(job.name, "failed", f"{job.source}: worker lost while processing "
                                                   f"({type(fut.exception()).__name__}: {fut.exception()})")
                record(row, f"{job.name}: {row['status']}")
                fut.release()
    finally:
        for fut in futures:
            fut.cancel()
    if not huge:
        return
    info = client.run(_worker_info, config)
    on_gpu = all(v["cuda"] for v in info.values())
    tile_batch = config.tile_batch or (8 if on_gpu else 1)
    window = 2 * sum(v["threads"] for v in info.values())
    for job in huge:
        if _cancelled(cancel):
            return
        try:
            row = _run_huge(client, job, config, tile_batch, window, message, cancel)
        except Cancelled:
            return
        record(row, f"{job.name}: {row['status']}")


def _worker_info(config: BatchConfig, dask_worker: Any = None) -> dict[str, Any]:
    return {"cuda": _device(config, dask_worker) != "cpu", "threads": int(dask_worker.state.nthreads)}


def write_summary(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write the summary rows as CSV (``SUMMARY_COLUMNS``), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a summary CSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _remove_stray_temporaries(output_dir: Path, jobs: list[Job]) -> None:
    """Remove temporary files of interrupted atomic writes (``engine.atomic`` names them
    ``.<stem>.<random>.tmp<suffix>``) left by workers killed mid-write."""
    stems = {j.output.stem for j in jobs} | {Path(SUMMARY_FILE).stem}
    for p in output_dir.glob(".*.tmp*"):
        stem = p.name[1:].rsplit(".tmp", 1)[0].rsplit(".", 1)[0]
        if stem in stems and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


def _model_ref(name_or_path: str) -> str:
    """A model folder as an absolute path; a shipped name as is (checked to exist)."""
    path = Path(name_or_path).expanduser()
    folder = resolve(name_or_path)
    return str(folder.resolve()) if path.exists() else str(name_or_path)


__all__ = ["BatchConfig", "BatchSummary", "Job", "load_source", "local_cluster_size", "model_loads",
           "open_client", "output_done", "plan_jobs", "process_image", "read_summary", "run_batch",
           "source_shape", "write_summary"]
