"""The DSRL ablation on CamVid: train every variant with one schedule, evaluate, print the table.

python scripts/ablation.py /work/runs/ablation --steps 300

Each variant trains in ``ROOT/<variant>`` (``python -m training dsrl ... --resume``, so an
interrupted sitting continues where it stopped; finished runs are not retrained), is exported to
``ROOT/<variant>/model`` with its CamVid val scores (input 240x180, ground truth at 480x360) and
measured for inference GFLOPs and parameters at 240x180 (padded to 240x192) (the SR branch and the FA module are
dropped at inference). Prints a markdown table and writes ``ROOT/ablation.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.checkpoints import load_checkpoint
from engine.models import SegmenterConfig, create_model
from engine.models.config import VARIANTS
from training.resume import load_state


def train_seconds(log_csv: Path) -> float:
    """Training time over all sittings (the log's clock restarts at each resume)."""
    total, previous = 0.0, 0.0
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["time"])
            total += t - previous if t >= previous else t
            previous = t
    return total


def inference_cost(card_config: dict, width: int, height: int) -> tuple[float, int]:
    """(GFLOPs of one forward at width x height, padded as inference pads it; parameters)."""
    model = create_model(SegmenterConfig.from_dict(card_config), inference=True).eval()
    m = model.pad_multiple
    x = torch.rand(1, 3, -(-height // m) * m, -(-width // m) * m)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9, sum(p.numel() for p in model.parameters())


def run_variant(root: Path, variant: str, args: argparse.Namespace) -> dict:
    run = root / variant
    state = run / "state"
    done = state.exists() and int(load_state(state)["step"]) >= args.steps
    if not done:
        command = [sys.executable, "-m", "training", "dsrl", "--data", "camvid", "--variant", variant,
                   "--crop", "256", "320", "--scale-range", "0.5", "1.5", "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                   "--workers", "1", "--threads", str(args.threads), "--ckpt-every", "50", "--run", str(run)]
        if state.exists():
            command.append("--resume")
        subprocess.run(command, check=True)
    model_dir = run / "model"
    if not (model_dir / "card.json").exists():
        subprocess.run([sys.executable, "-m", "app.cli", "train", "export", str(run), "--to", str(model_dir),
                        "--name", f"camvid-{variant}", "--input-size", "240", "180"], check=True)
    _, card = load_checkpoint(model_dir)
    scores = card.metrics["camvid_val"]
    gflops, params = inference_cost(card.config, 240, 180)
    return {"variant": variant, "miou": scores["miou"], "per_class": scores["per_class_iou"],
            "gflops": gflops, "params": params, "train_seconds": train_seconds(run / "log.csv"),
            "steps": args.steps}


def table(rows: list[dict]) -> str:
    lines = ["| variant | mIoU | inference GFLOPs (240x180) | params (M) | training time (min) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {100 * r['miou']:.1f} | {r['gflops']:.2f} | {r['params'] / 1e6:.2f} "
                     f"| {r['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder for the runs (outside the repository)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        rows.append(run_variant(args.root, variant, args))
        (args.root / "ablation.json").write_text(json.dumps(rows, indent=2))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
