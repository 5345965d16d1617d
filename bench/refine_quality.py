"""Does refinement help or hurt? IoU and mBA before/after for every refiner, mode and test set.

    python bench/refine_quality.py                                  # every refiner x mode x set
    python bench/refine_quality.py --sets idrid-seg --modes full edges --limit 3
    python bench/refine_quality.py --json out.json                  # also write every row

Sets (read from ../shared/data, never copied into the repository; ``--limit N`` takes the first N):

- ``idrid-gt8``: IDRiD val 45..54 at 4288x2848, all classes, coarse = the ground truth shrunk 8x
  (per-class area averaging, enlarged bilinearly, argmax);
- ``idrid-seg``: the same images with the shipped ``idrid`` segmenter's labels and probabilities;
- ``camvid``: CamVid val (480x360) with the shipped ``camvid`` segmenter's labels and probabilities
  (void pixels are left out of every score);
- ``composites``: each alpha-matting matte (binary at alpha > 127) composited over two of the
  public-domain backgrounds, coarse = the matte shrunk 8x;
- ``aeroplane``: the CascadePSP demo photo with its coarse mask. It has no ground truth: IoU and
  mBA are measured against the coarse mask itself (100 before), so "after" says how much was changed.

Per image: IoU is the mean over the ground truth's classes (every class of a binary mask: the
object and the background), mBA is ``engine.metrics.boundary_accuracy_multiclass``. Coarse inputs
are refined with ``Refiner.refine_labels`` as the apps do (probabilities passed when the segmenter
gave them). Each (refiner, mode, set) runs in a fresh process, so its peak RSS is its own; coarse
inputs are cached in ``--cache`` (default: a folder in the system temp dir).

The last column checks the property the front ends rely on: a mode "holds" on a set when its mean
IoU and mean mBA do not go down (by 0.01 points or more, the table's resolution) and no image loses
more than 1 point of either.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("FINEMASK_DATA", ROOT.parent / "shared" / "data"))
SETS = ("idrid-gt8", "idrid-seg", "camvid", "composites", "aeroplane")
TOLERANCE = 1.0  # points an image may lose
MEAN_RESOLUTION = 0.01  # points: a set's mean lower by less than this rounds to "unchanged" in the table


# --------------------------------------------------------------------------------------------
# Inputs: (name, image uint8, coarse labels, probs or None, ground truth, void value or None)


def _lowres_labels(gt: np.ndarray, factor: int = 8) -> np.ndarray:
    """Labels shrunk ``factor`` x per class (area averaging), enlarged bilinearly, argmax."""
    import torch
    import torch.nn.functional as F

    from engine.tiling import area_resize

    H, W = gt.shape
    h, w = max(1, H // factor), max(1, W // factor)
    classes = np.unique(gt)
    small = np.stack([area_resize((gt == c).astype(np.float32), h, w) for c in classes])
    best = np.zeros((H, W), np.float32)
    out = np.zeros((H, W), gt.dtype)
    for k, c in enumerate(classes):
        big = F.interpolate(torch.from_numpy(small[k])[None, None], size=(H, W), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        win = big > best
        out[win], best[win] = c, big[win]
    return out


def _items(name: str, limit: int | None):
    from PIL import Image

    from engine.io import read_image
    from training.data import load_dataset

    if name in ("idrid-gt8", "idrid-seg"):
        ds = load_dataset("idrid", "val", DATA / "idrid")
        seg = None
        for i in range(len(ds))[:limit]:
            image = (read_image(ds.image_paths[i]) * 255 + 0.5).astype(np.uint8)
            gt = ds.load_labels(i, image.shape[:2])
            if name == "idrid-gt8":
                yield ds.stem(i), image, _lowres_labels(gt), None, gt, None
            else:
                from engine.segment import Segmenter

                seg = seg or Segmenter.from_pretrained("idrid")
                r = seg.predict(image)
                yield ds.stem(i), image, r.labels, r.probs, gt, None
    elif name == "camvid":
        from engine.segment import Segmenter

        ds = load_dataset("camvid", "val", DATA / "camvid")
        seg = Segmenter.from_pretrained("camvid")
        for i in range(len(ds))[:limit]:
            image, gt = ds[i]
            image = np.asarray(image)
            if image.dtype != np.uint8:
                image = (image * 255 + 0.5).astype(np.uint8)
            r = seg.predict(image)
            yield ds.stem(i), image, r.labels, r.probs, np.asarray(gt), 255
    elif name == "composites":
        alphas = sorted((DATA / "alphamatting" / "alpha").glob("*.png"))[:limit]
        backs = sorted((DATA / "alphamatting" / "backgrounds").glob("*.jpg"))
        for k, path in enumerate(alphas):
            alpha = np.asarray(Image.open(path).convert("L"))
            H, W = alpha.shape
            fg = np.asarray(Image.open(backs[k % len(backs)]).convert("RGB").resize((W, H), Image.BILINEAR))
            bg = np.asarray(Image.open(backs[(k + 3) % len(backs)]).convert("RGB").resize((W, H), Image.BILINEAR))
            a = alpha[:, :, None].astype(np.float32) / 255.0
            image = (fg * a + bg * (1 - a) + 0.5).astype(np.uint8)
            gt = (alpha > 127).astype(np.uint8)
            yield path.stem, image, _lowres_labels(gt), None, gt, None
    elif name == "aeroplane":
        image = np.asarray(Image.open(DATA / "highres" / "aeroplane_3492x2328.jpg").convert("RGB"))
        coarse = (np.asarray(Image.open(DATA / "highres" / "aeroplane_3492x2328_coarse.png").convert("L")) > 127)
        coarse = coarse.astype(np.uint8)
        yield "aeroplane", image, coarse, None, coarse.copy(), None
    else:
        raise SystemExit(f"unknown set {name!r} (sets: {', '.join(SETS)})")


def cached_items(name: str, limit: int | None, cache: Path):
    """``_items`` with every input saved once under ``cache`` (segmentation is not re-run)."""
    folder = cache / name
    index = folder / "index.json"
    names = json.loads(index.read_text()) if index.is_file() else []
    if names and (limit is None or len(names) >= limit):
        for stem in names[:limit]:
            with np.load(folder / f"{stem}.npz") as z:
                probs = z["probs"] if "probs" in z.files else None
                yield stem, z["image"], z["coarse"], probs, z["gt"], (None if int(z["void"]) < 0 else int(z["void"]))
        return
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for stem, image, coarse, probs, gt, void in _items(name, limit):
        arrays = {"image": image, "coarse": coarse, "gt": gt, "void": np.int64(-1 if void is None else void)}
        if probs is not None:
            arrays["probs"] = probs
        np.savez(folder / f"{stem}.npz", **arrays)
        names.append(stem)
        yield stem, image, coarse, probs, gt, void
    index.write_text(json.dumps(names))


# --------------------------------------------------------------------------------------------
# Scores


def scores(pred: np.ndarray, gt: np.ndarray, void: int | None) -> tuple[float, float]:
    """(IoU %, mBA %) of one label map: IoU averaged over the ground truth's classes."""
    from engine.metrics import boundary_accuracy_multiclass

    valid = np.ones(gt.shape, bool) if void is None else gt != void
    ious = []
    for c in np.unique(gt[valid]):
        g, p = (gt == c) & valid, (pred == c) & valid
        ious.append((g & p).sum() / max(1, (g | p).sum()))
    mba = boundary_accuracy_multiclass(pred, gt, void=void)
    return 100 * float(np.mean(ious)), 100 * float(mba)


# --------------------------------------------------------------------------------------------
# One (refiner, mode, set) in this process


def run_child(args: argparse.Namespace) -> None:
    from engine.memory import peak_rss
    from engine.refine import Refiner
    from engine.refine_modes import mode_options

    refiner = Refiner.from_pretrained(args.refiner, num_threads=args.threads)
    rows = []
    for stem, image, coarse, probs, gt, void in cached_items(args.set, args.limit, Path(args.cache)):
        t0 = time.perf_counter()
        out = refiner.refine_labels(image, coarse, probs, **mode_options(args.mode))
        seconds = time.perf_counter() - t0
        iou0, mba0 = scores(coarse, gt, void)
        iou1, mba1 = scores(out, gt, void)
        rows.append({"image": stem, "iou_before": iou0, "iou_after": iou1, "mba_before": mba0, "mba_after": mba1,
                     "changed": 100 * float((out != coarse).mean()), "seconds": seconds})
        print(f"  {args.set} {stem} {args.mode}: IoU {iou0:.2f} -> {iou1:.2f}, mBA {mba0:.2f} -> {mba1:.2f}, "
              f"{seconds:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows, "peak_rss": peak_rss()}))


def run_one(refiner: str, mode: str, set_name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--refiner", refiner, "--mode", mode, "--set", set_name,
           "--cache", str(args.cache)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shipped_refiners() -> list[str]:
    from engine.checkpoints import available_models, read_card

    return [m for m in available_models() if read_card(m).task == "refinement"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refiners", nargs="+", default=None, help="default: every refinement model available")
    p.add_argument("--modes", nargs="+", default=None, help="default: every mode of engine.refine_modes")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--limit", type=int, default=None, help="first N images of each set")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "finemask-refine-quality")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--refiner", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--set", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    from engine.refine_modes import DEFAULT_MODE, REFINE_MODES

    refiners = args.refiners or shipped_refiners()
    modes = args.modes or list(REFINE_MODES)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {' '.join(sys.argv)}")
    results = []
    for refiner in refiners:
        for set_name in args.sets:
            for mode in modes:
                out = run_one(refiner, mode, set_name, args)
                results.append({"refiner": refiner, "mode": mode, "set": set_name, **out})
    print("\n| refiner | set | mode | images | IoU before | IoU after | mBA before | mBA after | worst image "
          "dIoU / dmBA | changed % | s / image | peak RSS GB | holds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = list({x["image"]: x for x in r["rows"]}.values())
        mean = {k: float(np.nanmean([x[k] for x in rows])) for k in rows[0] if k != "image"}
        d_iou = min(x["iou_after"] - x["iou_before"] for x in rows)
        d_mba = min((x["mba_after"] - x["mba_before"] for x in rows if not np.isnan(x["mba_before"])), default=0.0)
        holds = (mean["iou_after"] > mean["iou_before"] - MEAN_RESOLUTION
                 and mean["mba_after"] > mean["mba_before"] - MEAN_RESOLUTION
                 and d_iou >= -TOLERANCE and d_mba >= -TOLERANCE)
        r["holds"] = holds
        default = " (default)" if r["mode"] == DEFAULT_MODE else ""
        print(f"| {r['refiner']} | {r['set']} | {r['mode']}{default} | {len(rows)} | {mean['iou_before']:.2f} | "
              f"{mean['iou_after']:.2f} | {mean['mba_before']:.2f} | {mean['mba_after']:.2f} | "
              f"{d_iou:+.2f} / {d_mba:+.2f} | {mean['changed']:.2f} | {mean['seconds']:.1f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {'yes' if holds else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
