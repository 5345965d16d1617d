"""The Dask cluster a batch runs on: a running one, or a local one sized to this machine."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import FineMaskError

#: Memory a CPU worker is given when the local cluster is sized (models + one large image).
WORKER_MEMORY = 2 << 30


def local_cluster_size(n_workers: int | None = None, threads_per_worker: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster: a worker per GPU when there are GPUs,
    else cores // threads workers, at most one per ``WORKER_MEMORY`` of free memory."""
    from ..tiling import available_memory

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
