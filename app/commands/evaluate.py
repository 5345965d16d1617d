"""``finemask evaluate seg|refine|refine-crops|sr``: segmentation mIoU, refinement IoU / mBA, SR PSNR / SSIM."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    seg.add_argument("--record", action="store_true", help="store the scores in the model's card")
    seg.set_defaults(run=run_seg)

    ref = jobs.add_parser("refine", help="refinement IoU and mBA before/after, per class, at full resolution")
    ref.add_argument("--model", default=None, help="refinement model name or folder (default: cascadepsp once "
                                                   "installed, else refine-light)")
    ref.add_argument("--data", default="idrid")
    ref.add_argument("--split", default="val", help="idrid val = IDRiD_45..54, kept out of training")
    ref.add_argument("--images", type=int, default=None, help="only the first N images of the split")
    ref.add_argument("--segmenter", default=None, help="also refine this segmenter's masks (e.g. idrid)")
    ref.add_argument("--working-size", type=int, default=None, help="segmenter's longer side")
    ref.add_argument("--L", type=int, default=900, dest="L")
    ref.add_argument("--fast", action="store_true", help="global step only")
    ref.add_argument("--skip-global", action="store_true",
                     help="local step only, on the coarse mask (not in the paper)")
    ref.add_argument("--threads", type=int, default=None)
    ref.add_argument("--json", action="store_true", help="print every row as JSON")
    ref.add_argument("--record", action="store_true", help="store the summary in the refinement model's card")
    ref.set_defaults(run=run_refine)

    crops = jobs.add_parser("refine-crops", help="refinement IoU and mBA on perturbed 224x224 crops (its training "
                                                  "task), per source: tracks a training run")
    crops.add_argument("--model", default=None, help="refinement model name or folder (default: cascadepsp once "
                                                     "installed, else refine-light)")
    crops.add_argument("--sources", nargs="+", default=None,
                       help="crop sources (default: those training uses: camvid dubai isbi2012 idrid composites)")
    crops.add_argument("--split", default="val", help="split the crops come from (composites: its pictures)")
    crops.add_argument("--crops", type=int, default=100, help="crops per source (same crops every run)")
    crops.add_argument("--lowres", action="store_true",
                       help="coarse masks shrunk and enlarged (2-8x) instead of CascadePSP's perturbation")
    crops.add_argument("--threads", type=int, default=None)
    crops.add_argument("--json", action="store_true")
    crops.add_argument("--record", action="store_true", help="store the rows in the refinement model's card")
    crops.set_defaults(run=run_refine_crops)

    sr = jobs.add_parser("sr", help="PSNR/SSIM of a DSRL model's SR branch x2 against bicubic")
    sr.add_argument("--model", default="camvid", help="model name or folder that kept its SR branch")
    sr.add_argument("folder", type=Path, nargs="+",
                    help="folders of *_LR.png / *_HR.png pairs (e.g. sr/Set5/image_SRF_2)")
    sr.add_argument("--json", action="store_true")
    sr.add_argument("--record", action="store_true", help="store the scores in the model's card")
    sr.set_defaults(run=run_sr)


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
    if args.record:
        from engine.checkpoints import record_metrics

        record_metrics(args.model, f"{args.data}_{args.split}", scores.as_dict())
    if args.json:
        print(json.dumps(scores.as_dict(), indent=2))
        return 0
    print(f"{args.model} on {args.data} {args.split} ({scores.images} images): mIoU {100 * scores.miou:.2f}, "
          f"pixel accuracy {100 * scores.pixel_accuracy:.2f}")
    for name, iou in scores.per_class.items():
        print(f"  {name:<14} {100 * iou:6.2f}")
    return 0


def run_refine(args: argparse.Namespace) -> int:
    from engine.installed import default_refiner
    from engine.refine import Refiner
    from engine.segment import Segmenter
    from training.data.registry import load_dataset
    from training.evaluate import evaluate_refiner

    args.model = args.model or default_refiner()
    refiner = Refiner.from_pretrained(args.model, num_threads=args.threads)
    segmenter = Segmenter.from_pretrained(args.segmenter) if args.segmenter else None
    data = load_dataset(args.data, args.split)
    indices = list(range(len(data)))[: args.images]
    bar = tqdm(total=len(indices), desc="evaluate refine", unit="image")
    scores = evaluate_refiner(refiner, data, indices, segmenter=segmenter, working_size=args.working_size,
                              L=args.L, fast=args.fast, skip_global=args.skip_global,
                              on_progress=lambda d, t, m: bar.update(1))
    bar.close()
    if args.record:
        from engine.checkpoints import record_metrics

        record_metrics(args.model, f"{args.data}_{args.split}_refine", {
            "images": [data.stem(i) for i in indices], "L": args.L, "fast": args.fast,
            "skip_global": args.skip_global,
            "segmenter": args.segmenter, "summary": scores.summary()})
    if args.json:
        print(json.dumps({"rows": scores.rows, "summary": scores.summary()}, indent=2))
        return 0
    print(f"{args.model} on {args.data} {args.split} ({len(indices)} images), percent")
    print(f"{'coarse':10} {'class':16} {'n':>3} {'IoU before':>10} {'after':>6} {'mBA before':>10} {'after':>6}")
    for r in scores.summary():
        print(f"{r['source']:10} {r['class']:16} {r['images']:3d} {100 * r['iou_before']:10.1f} "
              f"{100 * r['iou_after']:6.1f} {100 * r['mba_before']:10.1f} {100 * r['mba_after']:6.1f}")
    return 0


def run_refine_crops(args: argparse.Namespace) -> int:
    from engine.installed import default_refiner
    from engine.refine import Refiner
    from training.data.refine_crops import REFINE_SOURCES, RefineCropConfig, build_refine_crops
    from training.evaluate import evaluate_refiner_crops

    args.model = args.model or default_refiner()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = Refiner.from_pretrained(args.model).model.float().cpu()
    config = RefineCropConfig(lowres_prob=1.0 if args.lowres else 0.0)
    crop_sets = {s: build_refine_crops(split=args.split, sources=(s,), length=args.crops, config=config)
                 for s in args.sources or REFINE_SOURCES}
    bar = tqdm(total=args.crops * len(crop_sets), desc="evaluate refine-crops", unit="crop")
    rows = evaluate_refiner_crops(model, crop_sets, args.crops, on_progress=lambda d, t, m: bar.update(d - bar.n))
    bar.close()
    if args.record:
        from engine.checkpoints import record_metrics

        key = f"crops_{args.split}{'_lowres' if args.lowres else ''}_refine"
        record_metrics(args.model, key, {"crops_per_source": args.crops, "rows": rows})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model} on {'low-resolution' if args.lowres else 'perturbed'} {args.split} crops, percent")
    print(f"{'source':12} {'crops':>5} {'IoU before':>10} {'after':>6} {'mBA before':>10} {'after':>6}")
    for r in rows:
        print(f"{r['source']:12} {r['crops']:5d} {100 * r['iou_before']:10.1f} {100 * r['iou_after']:6.1f} "
              f"{100 * r['mba_before']:10.1f} {100 * r['mba_after']:6.1f}")
    return 0


def run_sr(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_sr, sr_model

    model = sr_model(args.model)
    results = {str(f): evaluate_sr(model, f) for f in args.folder}
    if args.record:
        from engine.checkpoints import record_metrics

        record_metrics(args.model, "sr_x2", {Path(f).parent.name or str(f): r.__dict__ for f, r in results.items()},
                       merge=True)
    if args.json:
        print(json.dumps({k: v.__dict__ for k, v in results.items()}, indent=2))
        return 0
    print(f"{'folder':40} {'PSNR':>6} {'SSIM':>6} {'bicubic PSNR':>12} {'SSIM':>6}")
    for folder, r in results.items():
        print(f"{folder:40} {r.psnr:6.2f} {r.ssim:6.4f} {r.bicubic_psnr:12.2f} {r.bicubic_ssim:6.4f}")
    return 0
