"""``finemask evaluate seg --model M --data camvid``: mIoU and per-class IoU on a split."""
from __future__ import annotations

import argparse
import json

from tqdm import tqdm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model on a dataset split")
    jobs = p.add_subparsers(dest="job", required=True)
    seg = jobs.add_parser("seg", help="segmentation mIoU at full label resolution")
    seg.add_argument("--model", default="camvid", help="model name or folder")
    seg.add_argument("--data", default="camvid")
    seg.add_argument("--split", default="val")
    seg.add_argument("--working-size", type=int, default=None, help="longer side fed to the model")
    seg.add_argument("--json", action="store_true", help="print the scores as JSON")
    seg.set_defaults(run=run_seg)


def run_seg(args: argparse.Namespace) -> int:
    from engine.segment import Segmenter
    from training.data.registry import load_dataset
    from training.evaluate import evaluate_segmenter

    segmenter = Segmenter.from_pretrained(args.model)
    data = load_dataset(args.data, args.split)
    bar = tqdm(total=len(data), desc="evaluate", unit="image")
    scores = evaluate_segmenter(segmenter, data, working_size=args.working_size,
                                on_progress=lambda d, t, m: bar.update(1))
    bar.close()
    if args.json:
        print(json.dumps(scores.as_dict(), indent=2))
        return 0
    print(f"{args.model} on {args.data} {args.split} ({scores.images} images): mIoU {100 * scores.miou:.2f}, "
          f"pixel accuracy {100 * scores.pixel_accuracy:.2f}")
    for name, iou in scores.per_class.items():
        print(f"  {name:<14} {100 * iou:6.2f}")
    return 0
