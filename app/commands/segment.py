"""``finemask segment IMAGE|FOLDER -o OUT``: class labels for one image or a folder of images."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from app.commands.options import add_mode_arguments, chosen_mode
from engine.errors import FineMaskError
from engine.io import IMAGE_SUFFIXES, read_image, write_labels


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment an image or every image in a folder")
    p.add_argument("image", type=Path, help="image file or folder of images")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="labels file (.tif or .png) for one image; a folder for a folder")
    p.add_argument("--model", default="camvid", help="shipped model name or checkpoint folder")
    p.add_argument("--working-size", type=int, default=None, help="longer side fed to the model")
    p.add_argument("--refine", action="store_true", help="refine the labels at full resolution")
    p.add_argument("--refiner", default=None,
                   help="refinement model name or folder (default: cascadepsp once installed, else refine-light)")
    add_mode_arguments(p, prefix="with --refine: ")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engine.model_cache import shared_models
    from engine.pipeline import segment_image

    jobs = _jobs(args.image, args.output)
    models = shared_models()  # the per-image pipeline and model cache of napari, the web app and batch
    segmenter = models.segmenter(args.model)
    refiner = None
    if args.refine:
        from engine.installed import default_refiner

        refiner = models.refiner(args.refiner or default_refiner())
    mode = chosen_mode(args)
    failed = 0
    for src, dst in tqdm(jobs, desc="segment", unit="image", disable=len(jobs) == 1):
        try:
            image = read_image(src)
            labels = segment_image(segmenter, image, working_size=args.working_size, refiner=refiner,
                                   mode=mode).labels
            write_labels(dst, labels, palette=segmenter.palette)
        except FineMaskError as exc:
            if len(jobs) == 1:
                raise
            failed += 1
            tqdm.write(f"skipped: {exc}")
    if len(jobs) == 1:
        print(f"wrote {jobs[0][1]}")
    else:
        print(f"wrote {len(jobs) - failed} of {len(jobs)} label files to {args.output}")
    return 1 if failed else 0


def _jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(image, labels path) pairs: one for a file; one per image for a folder."""
    from app.commands.outputs import check_output_file, check_output_folder, folder_outputs

    if src.is_dir():
        images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FineMaskError("folder holds no images (.tif, .png, .jpg)", src)
        check_output_folder(dst, [src])
        return list(zip(images, folder_outputs(images, dst)))
    return [(src, check_output_file(dst, [src]))]
