"""``finemask refine IMAGE MASK -o OUT``: refine a coarse mask (or label map) at full resolution.

A binary mask (values 0/255 or 0/1) gives a binary mask back (0/255 PNG or TIFF), or with
``--soft`` the confidence scaled to 0..255. A label map with other values is refined class by
class and written as labels (palette PNG or TIFF).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.commands.options import add_mode_arguments, chosen_mode
from engine.refine_modes import mode_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="refine a coarse mask or label map at full resolution (CascadePSP)")
    p.add_argument("image", type=Path, help="image file (TIFF, PNG, JPEG)")
    p.add_argument("mask", type=Path, help="coarse mask (0/255 or 0/1) or label map (.png, .tif)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .png or .tif")
    p.add_argument("--model", default=None,
                   help="refinement model: shipped or installed name, checkpoint folder, or the official "
                        "CascadePSP weights file (.pth / 'model'); default: cascadepsp once installed "
                        "(`finemask models get cascadepsp`), else refine-light")
    add_mode_arguments(p, prefix="")
    p.add_argument("--L", type=int, default=900, dest="L", help="working size and tile size in pixels (900)")
    p.add_argument("--tiles", choices=("cover", "fraction", "boundary", "all"), default=None,
                   help="which full-resolution tiles to refine: cover (default: fewest tiles reaching every "
                        "boundary), fraction (the reference's 10-90%% foreground rule), boundary, all")
    p.add_argument("--soft", action="store_true", help="binary masks: write the confidence (0..255)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is faster when other programs keep the cores busy")
    p.set_defaults(run=run)


def load_refiner(model: str, device: str | None = None, threads: int | None = None):
    """A Refiner from a checkpoint name/folder, or from an official CascadePSP weights file."""
    from engine.refine import Refiner

    path = Path(model).expanduser()
    if path.is_file() and path.name not in ("model.safetensors", "card.json"):
        return Refiner.from_official_checkpoint(path, device=device, num_threads=threads)
    return Refiner.from_pretrained(model, device=device, num_threads=threads)


def run(args: argparse.Namespace) -> int:
    from app.commands.outputs import check_output_file
    from engine.io import read_image, read_labels, write_image, write_labels

    check_output_file(args.output, [args.image, args.mask], (".png", ".tif", ".tiff"))
    image = read_image(args.image)
    labels = read_labels(args.mask, shape=image.shape[:2])
    from engine.installed import default_refiner

    refiner = load_refiner(args.model or default_refiner(), args.device, args.threads)
    values = np.flatnonzero(np.bincount(labels.reshape(-1)))
    binary = set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}

    with tqdm(total=1, desc="refine", unit="step", leave=False) as bar:
        def on_progress(done: int, total: int, message: str) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

        kwargs = {**mode_options(chosen_mode(args)), "L": args.L, "on_progress": on_progress,
                  "selection": args.tiles}
        if binary:
            conf = refiner.refine(image, labels > 0, **kwargs)
            out = (np.clip(conf, 0, 1) * 255 + 0.5).astype(np.uint8) if args.soft else \
                np.where(conf > 0.5, 255, 0).astype(np.uint8)
            write_image(args.output, out)
        else:
            write_labels(args.output, refiner.refine_labels(image, labels, **kwargs))
    stats = refiner.stats
    detail = "" if kwargs["fast"] else f", {stats.tiles_processed} of {stats.tiles_total} tiles"
    print(f"wrote {args.output} (global {stats.global_seconds:.1f} s, local {stats.local_seconds:.1f} s{detail})")
    return 0
