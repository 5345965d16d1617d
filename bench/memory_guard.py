"""The memory guard's estimates against measured peak memory, for segmentation and refinement.

    python bench/memory_guard.py                       # camvid segmenter + light refiner, CPU
    python bench/memory_guard.py --sizes 2048x1536 4288x2848 --L 900

Each job runs in a fresh subprocess: load the model, make the input, reset the peak RSS
(``/proc/self/clear_refs``), run, and report the peak growth over the resident size just before
the job, next to the guard's estimate (fixed full-size buffers + the batch it planned). The
refiner is the light architecture with random weights (activation sizes do not depend on the
weights); tiles are ``"all"`` so the local step runs every tile.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(job: str, h: int, w: int, L: int, batch: int) -> dict:
    """Measure one job in this process; return estimate and measured peak growth (bytes)."""
    import numpy as np
    import torch

    from engine.memory import current_rss, peak_rss, reset_peak_rss
    from engine.preprocess import fit_longer_side

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    image = rng.random((h, w, 3), dtype=np.float32)
    if job == "segment":
        from engine.segment import Segmenter

        seg = Segmenter.from_pretrained("camvid", device="cpu")
        working = fit_longer_side(h, w, seg.working_size)
        estimate_batch = seg.batch_that_fits(working, [(h, w)])
        C = len(seg.classes)
        fixed = h * w * (2 * C + 1 + 24) + 8 * C * 256 * w
        item = int(seg._bytes_per_pixel() * working[0] * working[1]) + 12 * working[0] * working[1] \
            + 32 * C * working[0] * working[1]
        estimate = fixed + estimate_batch * item
        run = lambda: seg.predict(image)  # noqa: E731
    else:
        from engine.models.cascadepsp import RefinementModule, RefinerConfig
        from engine.refine import Refiner, global_size

        ref = Refiner(RefinementModule(RefinerConfig(backbone="light")), device="cpu", max_batch=batch)
        mask = np.zeros((h, w), bool)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        gh, gw = global_size(h, w, L)
        th, tw = max(gh, min(L, h)), max(gw, min(L, w))
        planned = ref.adaptive_batch_size(th, tw, fixed_bytes=6 * h * w, wanted=batch)
        estimate = 6 * h * w + planned * ref.tile_bytes(th, tw)
        run = lambda: ref.refine(image, mask, L=L, selection="all", batch_size=batch)  # noqa: E731
    run()  # warm-up: one-off allocations (weights conversion, thread pools) are not the job's
    base = current_rss()
    if not reset_peak_rss():
        raise SystemExit("this kernel cannot reset the peak RSS; run on Linux >= 4.0")
    run()
    return {"job": job, "size": f"{w}x{h}", "estimate": estimate, "measured": peak_rss() - base}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "2048x1536", "4288x2848"])
    parser.add_argument("--L", type=int, default=900)
    parser.add_argument("--batch", type=int, default=1, help="tile batch asked of the refiner")
    parser.add_argument("--one", nargs=3, metavar=("JOB", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job, h, w = args.one
        print(json.dumps(run_one(job, int(h), int(w), args.L, args.batch)))
        return 0
    print(f"# {platform.node()} · {platform.processor() or platform.machine()} · python {platform.python_version()}")
    print(f"{'job':8} {'size':>10} {'estimate MiB':>13} {'measured MiB':>13} {'estimate/measured':>18}")
    for size in args.sizes:
        w, h = map(int, size.split("x"))
        for job in ("segment", "refine"):
            out = subprocess.run([sys.executable, __file__, "--one", job, str(h), str(w), "--L", str(args.L),
                                  "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['job']:8} {r['size']:>10} {r['estimate'] / 2**20:13.0f} {r['measured'] / 2**20:13.0f} "
                  f"{r['estimate'] / max(1, r['measured']):18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
