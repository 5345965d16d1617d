"""Images per minute of ``finemask batch`` (``engine.batch.run_batch``) on local clusters of 1 and 2 workers.

    python bench/batch.py                              # 24 images 1280x720 from assets/samples, camvid
    python bench/batch.py --refine                     # + refinement (randomly initialised light refiner)
    python bench/batch.py --images 48 --size 1920x1080 --workers 1 2

Inputs are crops of the photos in assets/samples, resized to ``--size`` and written as JPEG to a
temporary folder. For each worker count a fresh ``LocalCluster`` (processes, 1 thread each) is
started; its start-up and the one model load per worker are timed apart from the run, so
"images/min" is the steady rate of the batch (planning, tasks, reading, segmenting, writing
labels and the summary). "worker CPU s/image" is the CPU time the workers (or the one process)
spent per image - a figure that, unlike the rate, does not depend on what else runs on the
machine. A baseline row runs the same images in this process, one after another,
as ``finemask segment FOLDER`` does (torch with all cores). No trained refiner ships yet, so
``--refine`` uses a randomly initialised light refiner: times are real, outputs meaningless.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` JPEGs of ``size`` (w, h): crops at different places of the sample photos."""
    from PIL import Image

    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "assets" / "samples").glob("*.jpg"))]
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(photo.width * scale), int(photo.width * scale * h / w)
        ch = min(ch, photo.height)
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR).save(folder / f"img{i:03d}.jpg",
                                                                                       quality=92)


def random_refiner(folder: Path) -> Path:
    import torch

    from engine.models.cascadepsp import RefinementModule, RefinerConfig
    from engine.refine import Refiner

    torch.manual_seed(0)
    return Refiner(RefinementModule(RefinerConfig()), device="cpu").save(folder, name="random-light",
                                                                        overwrite=True)


def run_cluster(workers: int, src: Path, out: Path, config) -> dict:
    from engine import batch
    from engine.batch.tasks import preload_models

    t0 = time.perf_counter()
    with batch.open_client(n_workers=workers, threads_per_worker=1) as client:
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        client.run(preload_models, config.checked())
        loaded = time.perf_counter() - t1
        cpu0 = client.run(time.process_time)
        t2 = time.perf_counter()
        summary = batch.run_batch(src, out, config, client=client)
        run = time.perf_counter() - t2
        cpu1 = client.run(time.process_time)
    assert summary.count("done") == len(summary.rows), summary.failed
    cpu = sum(cpu1[w] - cpu0[w] for w in cpu0 if w in cpu1)
    return {"start": started, "load": loaded, "run": run, "n": len(summary.rows), "cpu": cpu}


def run_single_process(src: Path, out: Path, config) -> dict:
    """The ``finemask segment FOLDER`` loop: one process, images one after another."""
    from engine.io import read_image, write_labels
    from engine.refine import Refiner
    from engine.segment import Segmenter

    t1 = time.perf_counter()
    seg = Segmenter.from_pretrained(config.model)
    ref = Refiner.from_pretrained(config.refiner) if config.refiner else None
    loaded = time.perf_counter() - t1
    images = sorted(src.iterdir())
    cpu0 = time.process_time()
    t2 = time.perf_counter()
    for p in images:
        image = read_image(p)
        result = seg.predict(image)
        labels = result.labels
        if ref is not None:
            labels = ref.refine_labels(image, labels, result.probs)
        write_labels(out / f"{p.stem}.tif", labels, palette=seg.palette)
    return {"start": 0.0, "load": loaded, "run": time.perf_counter() - t2, "n": len(images),
            "cpu": time.process_time() - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="1280x720", help="WxH of each image")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="camvid")
    parser.add_argument("--refine", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-process row")
    args = parser.parse_args()

    import torch

    from engine.batch import BatchConfig

    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        make_images(src, args.images, size)
        refiner = str(random_refiner(tmp / "refiner")) if args.refine else None
        config = BatchConfig(model=args.model, refiner=refiner)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {args.images} images {args.size}, model {args.model}, "
              f"refine {'random light' if args.refine else 'no'}; load average {os.getloadavg()[0]:.1f}")
        print("| setup | cluster start | model load | run | images/min | worker CPU s/image | load avg |")
        print("|---|---|---|---|---|---|---|")
        rows = []
        if not args.no_baseline:
            rows.append(("1 process, no Dask", lambda out: run_single_process(src, out, config)))
        for w in args.workers:
            rows.append((f"{w} worker{'s' if w > 1 else ''} x 1 thread",
                         lambda out, w=w: run_cluster(w, src, out, config)))
        for i, (name, fn) in enumerate(rows):
            out = tmp / f"out{i}"
            out.mkdir()
            r = fn(out)
            print(f"| {name} | {r['start']:.1f} s | {r['load']:.1f} s | {r['run']:.1f} s | "
                  f"{60 * r['n'] / r['run']:.1f} | {r['cpu'] / r['n']:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
