"""``finemask demo``: segment (and refine) the bundled sample with the shipped default models."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from app.overlay import overlay
from engine.checkpoints import available_models
from engine.io import read_image, write_image, write_labels

SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "samples" / "mountains.jpg"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="segment and refine the bundled sample image")
    p.add_argument("image", type=Path, nargs="?", default=SAMPLE, help="image (default: the bundled sample)")
    p.add_argument("-o", "--output", type=Path, default=Path("finemask-demo"), help="output folder")
    p.add_argument("--model", default="camvid")
    p.add_argument("--refiner", default=None,
                   help="refinement model (default: cascadepsp once installed, else refine-light)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engine.installed import default_refiner
    from engine.segment import Segmenter

    args.refiner = args.refiner or default_refiner()
    from app.commands.outputs import check_output_file, check_output_folder

    check_output_folder(args.output)
    for name in ("labels.tif", "overlay.png", "refined.tif", "refined_overlay.png"):
        check_output_file(args.output / name, [args.image], ())
    image = read_image(args.image)
    print(f"image: {args.image} ({image.shape[1]}x{image.shape[0]})")
    segmenter = Segmenter.from_pretrained(args.model)
    t0 = time.perf_counter()
    result = segmenter.predict(image)
    print(f"segmented with '{args.model}' at working size {result.working_size[1]}x{result.working_size[0]} "
          f"in {time.perf_counter() - t0:.2f} s")
    labels = result.labels
    out = args.output
    write_labels(out / "labels.tif", labels, palette=segmenter.palette)
    write_image(out / "overlay.png", overlay(image, labels, segmenter.palette))
    if args.refiner in available_models() or Path(args.refiner).is_dir():
        from engine.refine import Refiner

        t0 = time.perf_counter()
        labels = Refiner.from_pretrained(args.refiner).refine_labels(image, labels, result.probs)
        print(f"refined with '{args.refiner}' in {time.perf_counter() - t0:.2f} s")
        write_labels(out / "refined.tif", labels, palette=segmenter.palette)
        write_image(out / "refined_overlay.png", overlay(image, labels, segmenter.palette))
    else:
        print(f"refiner '{args.refiner}' is not installed; skipping refinement")
    counts = np.bincount(labels.ravel(), minlength=len(segmenter.classes))
    for name, share in sorted(zip(segmenter.classes, counts / counts.sum()), key=lambda t: -t[1]):
        if share >= 0.005:
            print(f"  {name:<12} {100 * share:5.1f} %")
    print(f"wrote {out}/ (labels.tif, overlay.png and, when refined, refined.tif, refined_overlay.png)")
    return 0
