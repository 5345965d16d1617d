"""A huge image on the cluster: segmented by a worker in row strips, refined here with the local
step's tile batches run as tasks that read their own crops from the file (``engine.huge``)."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import Cancelled
from ..huge import Box, CoarseSegmentation, LazyImage, refine_labels_tiled
from ..io import write_labels
from ..refine import GlobalResult
from ..tiling import Tile
from .config import BatchConfig, CancelFn, Job
from .planning import source_shape
from .summary import summary_row
from .tasks import (
    error_text,
    identity,
    predict_tile_batch,
    segment_huge,
    worker_refiner,
)


class ClusterTiles:
    """``TileRunner`` on a cluster: tile batches as tasks, at most ``window`` in flight, results
    yielded in submission order so they blend in the same order as on one machine."""

    def __init__(self, client: Any, source: str, config: BatchConfig, window: int):
        self.client, self.source, self.config, self.window = client, source, config, max(1, window)

    def __call__(self, box: Box, glob: GlobalResult, batches: list[list[Tile]]) -> Iterator[np.ndarray]:
        # A reduced-size global result goes in a task's own spec (not client.scatter), so the
        # scheduler can recompute it if the worker holding it dies. A full-resolution one (the
        # coarse mask, skip_global) is too big to send whole: each batch gets its tiles' window.
        g = None if glob.origin is not None else self.client.submit(identity, glob, pure=False)

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


def run_huge(client: Any, job: Job, config: BatchConfig, tile_batch: int, window: int,
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
            refiner = worker_refiner(config)  # the global steps run here, on this process's copy

            def progress(done: int, total: int, message: str) -> None:
                on_message(f"{job.name}: {message}")

            with LazyImage(job.source, max_pixels=config.huge_max_pixels) as img:
                labels = refine_labels_tiled(
                    img, labels, coarse.probs(), refiner, L=config.L, fast=config.fast,
                    skip_global=config.skip_global, selection=config.selection, batch_size=tile_batch,
                    run_tiles=ClusterTiles(client, str(job.source), config, window),
                    on_progress=progress, cancel=cancel)
        write_labels(job.output, labels, palette=palette)
        return summary_row(job.name, "done", seconds=time.perf_counter() - t0)
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad image does not stop the batch
        return summary_row(job.name, "failed", error_text(exc, job.source), time.perf_counter() - t0)
