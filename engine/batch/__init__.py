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

from .cluster import WORKER_MEMORY, local_cluster_size, open_client
from .config import LABELS_SUFFIX, BatchConfig, Job
from .planning import output_done, plan_jobs, source_shape
from .run import run_batch
from .summary import (
           SUMMARY_COLUMNS,
           SUMMARY_FILE,
           BatchSummary,
           read_summary,
           write_summary,
)
from .tasks import (
           load_source,
           model_loads,
           predict_tile_batch,
           process_image,
           segment_huge,
)

__all__ = ["LABELS_SUFFIX", "SUMMARY_COLUMNS", "SUMMARY_FILE", "WORKER_MEMORY", "BatchConfig", "BatchSummary",
           "Job", "load_source", "local_cluster_size", "model_loads", "open_client", "output_done", "plan_jobs",
           "predict_tile_batch", "process_image", "read_summary", "run_batch", "segment_huge", "source_shape",
           "write_summary"]
