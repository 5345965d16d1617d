"""``finemask demo``: segment (and refine) the bundled sample with the shipped default models."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.overlay import overlay
from engine.assets import SAMPLES_DIR
from engine.checkpoints import available_models
from engine.io import read_image, write_image, write_labels

SAMPLE = SAMPLES_DIR / "mountains.jpg"


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
    from engine.model_cache import shared_models
    from engine.pipeline import segment_image

    args.refiner = args.refiner or default_refiner()
    from app.commands.outputs import check_output_file, check_output_folder

    check_output_folder(args.output)
    for name in ("labels.tif", "overlay.png", "refined.tif", "refined_overlay.png"):
        check_output_file(args.output / name, [args.image], ())
    image = read_image(args.image)
    print(f"image: {args.image} ({image.shape[1]}x{image.shape[0]})")
    models = shared_models()  # the per-image pipeline and model cache of every front end
    segmenter = models.segmenter(args.model)
    installed = args.refiner in available_models() or Path(args.refiner).is_dir()
    result = segment_image(segmenter, image, refiner=models.refiner(args.refiner) if installed else None)
    working = result.segmentation.working_size
    print(f"segmented with '{args.model}' at working size {working[1]}x{working[0]} "
          f"in {result.seconds['segment']:.2f} s")
    labels = result.segmentation.labels
    out = args.output
    write_labels(out / "labels.tif", labels, palette=segmenter.palette)
    write_image(out / "overlay.png", overlay(image, labels, segmenter.palette))
    if result.refined:
        labels = result.labels
        print(f"refined with '{args.refiner}' in {result.seconds['refine']:.2f} s")
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
