"""``finemask batch INPUT_DIR OUTPUT_DIR [--refine] [--scheduler ADDRESS]``: a folder on a Dask cluster.

Writes ``OUTPUT_DIR/<stem>.tif`` per image and ``OUTPUT_DIR/summary.csv`` (file, status, error,
seconds). Re-running skips finished images. Exit code 0 when every image is done or skipped,
1 when any failed, 130 when interrupted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from app.commands.options import add_mode_arguments, chosen_mode


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="segment (and refine) every image in a folder on a Dask cluster")
    p.add_argument("input", type=Path, help="folder of images (.tif, .png, .jpg, .zarr)")
    p.add_argument("output", type=Path, help="folder for <name>.tif labels and summary.csv")
    p.add_argument("--model", default="camvid", help="segmentation model: shipped name or checkpoint folder")
    p.add_argument("--working-size", type=int, default=None, help="longer side fed to the segmenter")
    p.add_argument("--refine", action="store_true", help="refine the labels at full resolution")
    p.add_argument("--refiner", default=None,
                   help="refinement model name or folder (default: cascadepsp once installed, else refine-light)")
    add_mode_arguments(p, prefix="with --refine: ")
    p.add_argument("--L", type=int, default=900, dest="L", help="refiner working size and tile size (900)")
    p.add_argument("--tiles", choices=("cover", "fraction", "boundary", "all"), default="cover",
                   help="which tiles the refiner runs (cover)")
    p.add_argument("--tile-batch", type=int, default=None,
                   help="tiles per refinement batch (default: 1 on CPU workers, 8 on GPU workers)")
    p.add_argument("--huge-pixels", type=int, default=None,
                   help="TIFF/zarr images above this many pixels are read in parts and their refinement "
                        "tiles spread over the cluster (default: engine.huge.HUGE_PIXELS, about 6000 x 6000)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running Dask scheduler, e.g. tcp://host:8786 (default: start a local "
                        "cluster); its workers must see the folders under the same paths")
    p.add_argument("--workers", type=int, default=None,
                   help="local cluster: worker processes (default: one per GPU, else per core)")
    p.add_argument("--threads-per-worker", type=int, default=None,
                   help="local cluster: images each worker runs at once (default 1; each on one torch thread)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: a GPU per worker when present)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from app.commands.outputs import check_output_folder
    from engine.batch import BatchConfig, run_batch

    check_output_folder(args.output, [args.input])
    from engine.installed import default_refiner

    huge = {} if args.huge_pixels is None else {"huge_pixels": args.huge_pixels}
    refiner = (args.refiner or default_refiner()) if args.refine else None
    from engine.refine_modes import mode_options

    config = BatchConfig(model=args.model, refiner=refiner, **mode_options(chosen_mode(args)), L=args.L,
                         working_size=args.working_size,
                         selection=args.tiles, tile_batch=args.tile_batch, device=args.device, **huge)
    with tqdm(total=0, desc="batch", unit="image", dynamic_ncols=True) as bar:
        def on_progress(done: int, total: int, message: str) -> None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.set_postfix_str(message[-60:], refresh=False)
            bar.refresh()

        summary = run_batch(args.input, args.output, config, scheduler=args.scheduler, n_workers=args.workers,
                            threads_per_worker=args.threads_per_worker, on_progress=on_progress)
    done, skipped, failed = (summary.count(s) for s in ("done", "skipped", "failed"))
    for row in summary.failed:
        print(f"failed: {row['error']}")
    where = f" on {summary.workers} worker{'s' if summary.workers != 1 else ''}" if summary.workers else ""
    print(f"{done} done, {skipped} skipped, {failed} failed of {len(summary.rows)} images{where} "
          f"in {summary.seconds:.1f} s; summary: {summary.csv_path}")
    if summary.cancelled:
        return 130
    return 1 if failed else 0
