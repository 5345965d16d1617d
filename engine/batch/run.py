"""``run_batch``: every image of a folder through the cluster, resumable, one summary row each."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Cancelled, FineMaskError
from ..huge import is_lazy_readable
from .cluster import open_client
from .config import BatchConfig, CancelFn, Job, ProgressFn
from .huge_runner import run_huge
from .planning import output_done, plan_jobs, remove_stray_temporaries, source_shape
from .summary import SUMMARY_FILE, BatchSummary, summary_row, write_summary
from .tasks import preload_models, process_image, worker_info


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
                record(summary_row(job.name, "failed", job.error), f"{job.name}: failed")
                continue
            try:
                lazy = is_lazy_readable(job.source)
                shape = source_shape(job.source, max_pixels=config.huge_max_pixels if lazy else config.max_pixels)
            except FineMaskError as exc:
                record(summary_row(job.name, "failed", str(exc)), f"{job.name}: failed")
                continue
            if output_done(job.output, shape):
                record(summary_row(job.name, "skipped"), f"{job.name}: already done")
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
            rows.setdefault(job.name, summary_row(job.name, unfinished))
        summary.rows = [rows[j.name] for j in jobs]
        summary.cancelled = any(r["status"] == "cancelled" for r in summary.rows)
        remove_stray_temporaries(output_dir, jobs)
        write_summary(summary.csv_path, summary.rows)
        summary.seconds = time.perf_counter() - t_start
    return summary


def _cancelled(cancel: CancelFn | None) -> bool:
    return cancel is not None and bool(cancel())


def _prepare_workers(client: Any, config: BatchConfig) -> int:
    """Load the models on every worker now; return the number of workers."""
    devices = client.run(preload_models, config)
    if not devices:
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, OSError):
            raise FineMaskError("the Dask cluster has no workers") from None
        devices = client.run(preload_models, config)
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
                    row = summary_row(job.name, "failed", f"{job.source}: worker lost while processing "
                                                   f"({type(fut.exception()).__name__}: {fut.exception()})")
                record(row, f"{job.name}: {row['status']}")
                fut.release()
    finally:
        for fut in futures:
            fut.cancel()
    if not huge:
        return
    info = client.run(worker_info, config)
    on_gpu = all(v["cuda"] for v in info.values())
    tile_batch = config.tile_batch or (8 if on_gpu else 1)
    window = 2 * sum(v["threads"] for v in info.values())
    for job in huge:
        if _cancelled(cancel):
            return
        try:
            row = run_huge(client, job, config, tile_batch, window, message, cancel)
        except Cancelled:
            return
        record(row, f"{job.name}: {row['status']}")
