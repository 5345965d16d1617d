"""What the refinement target asks for: IoU and mBA of ground truth shrunk by f and enlarged back.

PYTHONPATH=. python scripts/coarse_bound.py --data idrid --split val --factors 2 4 8

The coarse masks of ``finemask evaluate refine`` are the f=8 row. Each other row says how good a
mask would be had it been made at 1/f of the full size, which places a target such as "mBA 10 points
above gt/8" on the scale of working sizes. Prints a markdown table (percent, means over masks).
"""
from __future__ import annotations

import argparse

import numpy as np

from engine.metrics import boundary_accuracy, dataset_iou
from training.data import load_dataset
from training.evaluate import coarse_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="idrid")
    parser.add_argument("--split", default="val")
    parser.add_argument("--factors", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args()
    data = load_dataset(args.data, args.split)
    scores: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for i in range(len(data)):
        _, masks = data.binary_masks(i)
        for cls, gt in masks.items():
            for f in args.factors:
                coarse = coarse_mask(gt, f)
                score = (dataset_iou([(coarse, gt)]), boundary_accuracy(coarse, gt))
                for key in ((f, cls), (f, "all")):
                    scores.setdefault(key, []).append(score)
        print(f"{data.stem(i)} done", flush=True)
    print("| factor | class | masks | IoU | mBA |\n|---|---|---|---|---|")
    for (f, cls), values in sorted(scores.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1])):
        iou, mba = np.nanmean(np.array(values), axis=0) * 100
        print(f"| gt/{f} | {cls} | {len(values)} | {iou:.1f} | {mba:.1f} |")


if __name__ == "__main__":
    main()
