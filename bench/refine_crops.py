"""Seconds per refinement training crop, per source, with and without the decode cache.

    python bench/refine_crops.py                          # ../shared/data, 150 warm-up + 150 timed crops
    python bench/refine_crops.py --warmup 300 --crops 300 --cache-mb 0 2048

Each source is sampled on its own (one process, one torch thread, like a DataLoader worker):
``--warmup`` crops fill the caches, then ``--crops`` crops are timed (wall and process CPU time).
``--cache-mb 0`` keeps only the newest decoded file, which is how the sources read before the
cache; the composites' reduced-scale JPEG decoding is on in both.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_source(source, cfg, warmup: int, crops: int) -> tuple[float, float]:
    """(wall s, CPU s) per crop of ``source`` after ``warmup`` untimed crops."""
    rng = np.random.default_rng(0)
    for _ in range(warmup):
        source.sample(rng, cfg)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(crops):
        source.sample(rng, cfg)
    return (time.perf_counter() - wall) / crops, (time.process_time() - cpu) / crops


def main() -> None:
    import torch

    from training.data.refine_crops import RefineCropConfig, build_refine_crops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="data root (default ../shared/data)")
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--crops", type=int, default=150)
    parser.add_argument("--cache-mb", type=int, nargs="+", default=[0, 2048])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread; "
          f"{args.warmup} warm-up + {args.crops} timed crops per source")
    print(f"{'cache MB':>8}  {'source':<16}{'wall s/crop':>12}{'CPU s/crop':>12}")
    for cache_mb in args.cache_mb:
        cfg = RefineCropConfig(cache_mb=cache_mb)
        crops = build_refine_crops(args.data, config=cfg)
        for source, weight in zip(crops.sources, crops.weights, strict=True):
            wall, cpu = time_source(source, cfg, args.warmup, args.crops)
            print(f"{cache_mb:>8}  {source.name:<16}{wall:>12.4f}{cpu:>12.4f}   (weight {weight:.2f})")


if __name__ == "__main__":
    main()
