"""Benchmark CascadePSP refinement on a 4K image: time, tiles, peak memory, tile-selection quality.

    python bench/refine.py                                   # synthetic 3840x2160, light, CPU
    python bench/refine.py --backbones light resnet50 --selections fraction boundary cover
    python bench/refine.py --dataset idrid:hard_exudates:IDRiD_03 --threads 1
    python bench/refine.py --reference-src DIR               # also time hkchengrex/CascadePSP
    python bench/refine.py --labels IDRiD_45 --modes local full  # a 6-class 4K label map (refine_labels)

Every configuration runs in a fresh subprocess, so "peak RSS" is that run's whole process
(Python, torch, the input arrays and the refinement). Data is read from ../shared/data when asked
and never copied into the repository.

Without trained weights (``--weights``), the network is randomly initialised: timings are real,
but a random global step would output noise and select arbitrary tiles. The global step is still
run and timed, and its output is then replaced by what a trained model approximately returns -
the coarse mask, area-resized - so the local step processes the tiles a real run would.
Tile-selection quality is measured with an oracle: each processed tile's written region is
replaced by ground truth, the rest keeps the coarse result, and IoU / mBA of that image against
the ground truth is the best any model could reach with that selection.

``--reference-src DIR`` points at a checkout of hkchengrex/CascadePSP's ``segmentation-refinement``
folder (holding ``segmentation_refinement/``); its module is loaded with the same random weights
and its global pass and one 900 x 900 tile are timed; its total is extrapolated as global + tiles
x per-tile time with the reference's own tile rule (10%-90% foreground) on the same input.
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
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# Inputs


def synthetic_scene(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB image and bool ground truth: a wavy blob with thin spikes, textured colours."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((h, w), bool)
    img = np.empty((h, w, 3), np.uint8)
    cy, cx, rad = h * 0.5, w * 0.45, 0.32 * min(h, w)
    noise_lo = rng.normal(0, 1, (h // 64 + 2, w // 64 + 2))
    for r0 in range(0, h, 256):
        yy = np.arange(r0, min(h, r0 + 256))[:, None].astype(np.float64)
        xx = np.arange(w)[None, :].astype(np.float64)
        ang = np.arctan2(yy - cy, xx - cx)
        r = np.hypot(yy - cy, xx - cx) / rad
        edge = 1 + 0.12 * np.sin(5 * ang) + 0.05 * np.sin(23 * ang) + 0.25 * np.maximum(0, np.cos(40 * ang)) ** 30
        inside = r < edge
        inside |= (np.abs(yy - h * 0.2) < 6) & (xx > w * 0.6) & (xx < w * 0.9)  # a thin bar
        gt[r0:r0 + len(yy)] = inside
        tex = noise_lo[(yy // 64).astype(int), (xx // 64).astype(int)]
        fg = np.stack([190 + 20 * tex, 90 + 15 * tex, 50 + 10 * tex], -1)
        bg = np.stack([40 + 10 * tex, 110 + 20 * tex, 170 + 15 * tex], -1)
        px = np.where(inside[..., None], fg, bg) + rng.normal(0, 8, fg.shape)
        img[r0:r0 + len(yy)] = np.clip(px, 0, 255).astype(np.uint8)
    return img, gt


def coarse_from_gt(gt: np.ndarray, factor: int = 16) -> np.ndarray:
    """What a low-resolution segmenter gives: the ground truth area-shrunk by ``factor``,
    thresholded, and enlarged again (blocky boundary, thin parts lost)."""
    from engine.tiling import area_resize

    h, w = gt.shape
    low = area_resize(gt, max(1, h // factor), max(1, w // factor)) > 0.5
    ys = np.minimum(np.arange(h) * low.shape[0] // h, low.shape[0] - 1)
    xs = np.minimum(np.arange(w) * low.shape[1] // w, low.shape[1] - 1)
    return low[ys][:, xs]


def load_inputs(spec: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(image uint8, coarse bool, ground truth bool or None, description)."""
    from PIL import Image

    if spec == "synthetic":
        img, gt = synthetic_scene(size[1], size[0])
        return img, coarse_from_gt(gt), gt, f"synthetic {size[0]}x{size[1]}, coarse = GT shrunk 16x"
    if spec.startswith("idrid"):
        _, cls, name = (spec.split(":") + ["optic_disc", "IDRiD_01"])[:3]
        img = np.asarray(Image.open(DATA / "idrid" / "images" / f"{name}.jpg").convert("RGB"))
        gt = np.asarray(Image.open(DATA / "idrid" / f"masks_{cls}" / f"{name}.png").convert("L")) > 127
        return img, coarse_from_gt(gt), gt, f"IDRiD {name} {cls} {img.shape[1]}x{img.shape[0]}, coarse = GT shrunk 16x"
    if spec == "highres":
        img = np.asarray(Image.open(DATA / "highres" / "aeroplane_3492x2328.jpg").convert("RGB"))
        coarse = np.asarray(Image.open(DATA / "highres" / "aeroplane_3492x2328_coarse.png").convert("L")) > 127
        return img, coarse, None, "CascadePSP demo aeroplane 3492x2328 with its coarse mask (no GT)"
    raise SystemExit(f"unknown --dataset {spec!r}")


# --------------------------------------------------------------------------------------------
# One configuration, in a child process


from engine.memory import current_rss, peak_rss  # noqa: E402  (VmHWM: not inherited from the parent)


def proxy_global(coarse: np.ndarray, like):
    """The coarse mask at the global step's size, standing in for a trained model's output."""
    import torch

    from engine.refine import GlobalResult
    from engine.tiling import area_resize

    gh, gw = like.os1.shape
    low = torch.from_numpy(area_resize(coarse, gh, gw))
    return GlobalResult(os1=low, os4=low.clone(), full_shape=like.full_shape)


def make_refiner(cfg: dict):
    import torch

    from engine.models.cascadepsp import RefinementModule, RefinerConfig
    from engine.refine import Refiner

    kw = {"device": cfg["device"], "num_threads": cfg["threads"], "reuse_cpu_memory": not cfg["no_reuse"],
              "precision": cfg["precision"]}
    if cfg["weights"]:
        w = Path(cfg["weights"])
        if w.is_file():
            return Refiner.from_official_checkpoint(w, **kw), True
        return Refiner.from_pretrained(w, **kw), True
    torch.manual_seed(0)
    return Refiner(RefinementModule(RefinerConfig(backbone=cfg["backbone"])), **kw), False


def run_child(cfg: dict) -> dict:
    import torch

    data = np.load(cfg["data"])
    img, coarse = data["image"], data["coarse"]
    ref, trained = make_refiner(cfg)
    base = current_rss()
    real_global = ref.global_step
    if not trained:
        ref.global_step = lambda image, mask, binarise, L: proxy_global(coarse, real_global(image, mask, binarise, L))
    if ref.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = ref.refine(img, coarse, fast=cfg["fast"], L=cfg["L"], selection=cfg["selection"],
                     batch_size=cfg["batch_size"])
    if ref.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    s = ref.stats
    result = {"total_s": total, "global_s": s.global_seconds, "local_s": s.local_seconds, "tiles": s.tiles_processed,
                  "tiles_total": s.tiles_total, "batch": s.batch_size, "peak_rss": peak_rss(), "base_rss": base,
                  "threads": torch.get_num_threads() if not cfg["threads"] else cfg["threads"],
                  "precision": ref.precision,
                  "written": [[t.wy0, t.wy1, t.wx0, t.wx1] for t in s.processed]}
    if ref.device.type == "cuda":
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    if trained and data["gt"].size:
        from engine.metrics import boundary_accuracy, dataset_iou

        result["iou"] = dataset_iou([(out, data["gt"])])
        result["mba"] = boundary_accuracy(out, data["gt"])
    return result


def run_labels_child(cfg: dict) -> dict:
    """``Refiner.refine_labels`` of the shipped ``idrid`` segmenter's labels, with the shipped refiner."""
    import torch

    from engine.refine import Refiner
    from engine.refine_modes import mode_options

    data = np.load(cfg["data"])
    img, labels, probs = data["image"], data["labels"], data["probs"]
    ref = Refiner.from_pretrained(cfg["weights"] or "refine-light", num_threads=cfg["threads"] or None)
    base = current_rss()
    t0 = time.perf_counter()
    ref.refine_labels(img, labels, probs, L=cfg["L"], **mode_options(cfg["mode"]))
    return {"total_s": time.perf_counter() - t0, "peak_rss": peak_rss(), "base_rss": base,
            "threads": torch.get_num_threads()}


def bench_labels(args: argparse.Namespace) -> None:
    """Time and peak memory of refining a multi-class 4K label map, per mode."""
    from engine.io import read_image
    from engine.segment import Segmenter

    image = (read_image(DATA / "idrid" / "images" / f"{args.labels}.jpg") * 255 + 0.5).astype(np.uint8)
    seg = Segmenter.from_pretrained("idrid").predict(image)
    classes = int((np.bincount(seg.labels.ravel()) > 0).sum())
    print(f"# IDRiD {args.labels} {image.shape[1]}x{image.shape[0]}, {classes} classes from the idrid segmenter; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}\n# command: python bench/refine.py "
          f"{' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "labels.npz"
        np.savez(npz, image=image, labels=seg.labels, probs=seg.probs)
        for mode in args.modes:
            load = os.getloadavg()[0]
            r = spawn({"labels": True, "data": str(npz), "mode": mode, "L": args.L, "threads": args.threads[0],
                       "weights": args.weights})
            print(f"{mode:6s}: {r['total_s']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                  f"(before refining {r['base_rss'] / 2**30:.2f}), threads {r['threads']}, "
                  f"load {load:.1f}->{os.getloadavg()[0]:.1f}", flush=True)


def run_reference_child(cfg: dict) -> dict:
    """Time the public reference implementation (same random weights) on the same input."""
    import torch

    src = Path(cfg["reference_src"]).resolve()
    pkg = types.ModuleType("segmentation_refinement")  # skip its __init__ (it needs torchvision)
    pkg.__path__ = [str(src / "segmentation_refinement")]
    sys.modules["segmentation_refinement"] = pkg
    from segmentation_refinement.eval_helper import resize_max_side, safe_forward
    from segmentation_refinement.models.psp.pspnet import RefinementModule as Reference

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data = np.load(cfg["data"])
    img, coarse = data["image"], data["coarse"]
    torch.manual_seed(0)
    model = Reference().eval()
    L = cfg["L"]
    with torch.no_grad():
        # as the reference's Refiner.refine: full-size normalised tensors
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        im = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std
        seg = torch.from_numpy(coarse.astype(np.float32))[None, None] * 2 - 1
        t0 = time.perf_counter()
        out = safe_forward(model, resize_max_side(im, L, "area"), resize_max_side(seg, L, "area"))
        glob = time.perf_counter() - t0
        del out
        tile_im, tile_seg = im[:, :, :L, :L], seg[:, :, :L, :L]
        times = []
        for _ in range(cfg["reference_tiles"]):
            t0 = time.perf_counter()
            safe_forward(model, tile_im, tile_seg, tile_seg)
            times.append(time.perf_counter() - t0)
    return {"global_s": glob, "tile_s": float(np.mean(times)), "peak_rss": peak_rss()}


# --------------------------------------------------------------------------------------------
# Parent: run configurations, score tile selections, print a table


NEAR = 64  # px: coarse errors this close to the coarse boundary are what refinement can fix


def oracle_scores(gt: np.ndarray, coarse: np.ndarray, near: np.ndarray,
                  written: list[list[int]]) -> tuple[float, float, float, float]:
    """With perfect tiles: (IoU, mBA, share of all coarse errors inside processed tiles, share of
    coarse errors within ``NEAR`` px of the coarse boundary inside processed tiles)."""
    from engine.metrics import boundary_accuracy, dataset_iou

    pred = coarse.copy()
    inside = np.zeros(gt.shape, bool)
    for y0, y1, x0, x1 in written:
        pred[y0:y1, x0:x1] = gt[y0:y1, x0:x1]
        inside[y0:y1, x0:x1] = True
    err = coarse != gt
    covered = float((err & inside).sum() / max(1, err.sum()))
    covered_near = float((err & near & inside).sum() / max(1, (err & near).sum()))
    return dataset_iou([(pred, gt)]), boundary_accuracy(pred, gt), covered, covered_near


def near_boundary(mask: np.ndarray, dist: int = NEAR) -> np.ndarray:
    """Pixels within ``dist`` px (Euclidean) of the mask's boundary."""
    from scipy import ndimage

    edge = mask ^ ndimage.binary_erosion(mask, border_value=1)
    return ndimage.distance_transform_edt(~edge) <= dist


def spawn(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cfg.get("threads"):
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                          text=True, check=False, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {cfg}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic | highres | idrid[:CLASS[:NAME]] (e.g. idrid:optic_disc:IDRiD_01)")
    p.add_argument("--size", default="3840x2160", help="synthetic image size WxH")
    p.add_argument("--backbones", nargs="+", default=["light"], choices=["light", "resnet50"])
    p.add_argument("--selections", nargs="+", default=["fraction"], choices=["fraction", "boundary", "cover", "all"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="+", default=[0], help="torch threads (0: torch default)")
    p.add_argument("--L", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--no-reuse", action="store_true", help="disable engine.memory.reuse_freed_memory")
    p.add_argument("--weights", default=None, help="trained checkpoint folder or official CascadePSP file")
    p.add_argument("--reference-src", default=None, help="folder holding hkchengrex's segmentation_refinement/")
    p.add_argument("--reference-tiles", type=int, default=1, help="reference tiles to time (averaged)")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle scores (slow beyond 8K)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--labels", default=None, metavar="IDRID_NAME",
                   help="refine the idrid segmenter's label map of this IDRiD image (e.g. IDRiD_45)")
    p.add_argument("--modes", nargs="+", default=["local", "fast", "full"], help="with --labels")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        cfg = json.loads(args.child)
        child = run_reference_child if cfg.get("reference") else run_labels_child if cfg.get("labels") else run_child
        print(json.dumps(child(cfg)))
        return 0
    if args.labels:
        bench_labels(args)
        return 0

    size = tuple(int(v) for v in args.size.lower().split("x"))
    img, coarse, gt, desc = load_inputs(args.dataset, size)
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
               f"{ram:.0f} GiB RAM, torch {torch.__version__}")
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {desc}\n# {machine}\n# command: python bench/refine.py {command}")
    results = []
    near = near_boundary(coarse) if gt is not None and not args.no_oracle else None
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "data.npz"
        np.savez(npz, image=img, coarse=coarse, gt=gt if gt is not None else np.zeros(0, bool))
        if args.reference_src:
            for threads in args.threads:
                cfg = {"reference": True, "reference_src": args.reference_src, "data": str(npz), "L": args.L,
                       "threads": threads, "reference_tiles": args.reference_tiles}
                load = os.getloadavg()[0]
                r = spawn(cfg)
                # tiles the reference would process: its 10%-90% rule ("fraction") on the same input
                n = spawn({"backbone": "light", "selection": "fraction", "device": "cpu", "threads": threads,
                           "L": args.L, "batch_size": None, "fast": False, "no_reuse": False, "weights": None,
                           "data": str(npz), "precision": "auto"})["tiles"]
                r.update(kind="reference", backbone="resnet50 (reference)", selection="fraction", tiles=n,
                         total_s=r["global_s"] + n * r["tile_s"], load=load, threads=threads)
                results.append(r)
                print(f"reference threads={threads or 'default'}: global {r['global_s']:.1f} s, "
                      f"{r['tile_s']:.1f} s/tile x {n} tiles -> {r['total_s']:.0f} s (extrapolated), "
                      f"peak RSS so far {r['peak_rss'] / 2**30:.2f} GiB, load {load:.1f}", flush=True)
        for backbone in args.backbones:
            for selection in args.selections:
                for threads in args.threads:
                    cfg = {"backbone": backbone, "selection": selection, "device": args.device, "threads": threads,
                           "L": args.L, "batch_size": args.batch_size, "fast": args.fast, "no_reuse": args.no_reuse,
                           "weights": args.weights, "data": str(npz), "precision": args.precision}
                    load = os.getloadavg()[0]
                    r = spawn(cfg)
                    r.update(kind="ours", backbone=backbone, selection=selection, load=load,
                             load_after=os.getloadavg()[0])
                    if gt is not None and not args.fast and not args.no_oracle:
                        (r["oracle_iou"], r["oracle_mba"], r["err_covered"],
                         r["near_err_covered"]) = oracle_scores(gt, coarse, near, r["written"])
                    results.append(r)
                    line = (f"{backbone:8s} {selection:8s} {r['precision']} threads={r['threads']} batch={r['batch']}: "
                            f"total {r['total_s']:.1f} s (global {r['global_s']:.1f} s, local {r['local_s']:.1f} s), "
                            f"tiles {r['tiles']}/{r['tiles_total']}, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                            f"(before refine {r['base_rss'] / 2**30:.2f}), load {load:.1f}->{r['load_after']:.1f}")
                    if "peak_cuda" in r:
                        line += f", peak CUDA {r['peak_cuda'] / 2**30:.2f} GiB"
                    if "oracle_iou" in r:
                        line += (f"; oracle IoU {r['oracle_iou']:.4f} mBA {r['oracle_mba']:.4f}, "
                                 f"coarse errors in tiles {100 * r['err_covered']:.1f}% "
                                 f"(within {NEAR} px of its boundary {100 * r['near_err_covered']:.1f}%)")
                    if "iou" in r:
                        line += f"; IoU {r['iou']:.4f} mBA {r['mba']:.4f}"
                    print(line, flush=True)
    if gt is not None and not args.no_oracle:
        from engine.metrics import boundary_accuracy, dataset_iou

        print(f"coarse input: IoU {dataset_iou([(coarse, gt)]):.4f} mBA {boundary_accuracy(coarse, gt):.4f}")
    if args.json:
        for r in results:
            r.pop("written", None)
        args.json.write_text(json.dumps({"data": desc, "machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
