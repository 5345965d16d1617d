"""Fine-tuning's memory estimate (``training.finetune_checks.check_memory``) against measured peak.

    python bench/finetune_memory.py                         # camvid, crops 128 and 256, batch 2 and 4, CPU

Each setting runs in a fresh subprocess: a store of 6 random 480x360 pairs, the shipped
``camvid`` segmenter as a fine-tuning job, the estimate; then, with the peak RSS reset, three
training steps (forward, the DSRL loss, backward, AdamW step), reporting the peak growth over
the resident size before the first step plus the float32 weights already resident (the
estimate counts them).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(crop: int, batch: int, classes: int | None) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from engine.checkpoints import load_checkpoint, resolve
    from engine.memory import current_rss, peak_rss, reset_peak_rss
    from engine.store import Store
    from training.finetune import FinetuneConfig, SegmentationJob
    from training.finetune_checks import check_memory

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    store = Store.open(Path(tempfile.mkdtemp()) / "store")
    top = 11 if classes is None else classes
    for i in range(6):
        labels = rng.integers(0, 11, (360, 480)).astype(np.uint16)
        labels[:8, :8] = top - 1  # the highest class id, so the model gets ``top`` classes
        store.add(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), labels, "corrected", name=f"p{i}")
    state, card = load_checkpoint(resolve("camvid"))
    job = SegmentationJob(state, card, store, FinetuneConfig(crop=(crop, crop), batch_size=batch))
    estimate = check_memory(job, batch, device="cpu")
    loader = DataLoader(job.train_data, batch_size=batch,
                        sampler=[(0, i % len(job.train_data)) for i in range(3 * batch)])
    batches = list(loader)
    model = job.model.train()
    opt = torch.optim.AdamW(job.params(1e-4))
    weights = 4 * sum(p.numel() for p in model.parameters())
    base = current_rss()
    if not reset_peak_rss():
        raise SystemExit("this kernel cannot reset the peak RSS; run on Linux >= 4.0")
    for b in batches:
        loss, _ = job.loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"crop": crop, "batch": batch, "classes": int(model.num_classes), "estimate": estimate,
            "measured": peak_rss() - base + weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--classes", type=int, default=None, help="give the model this many classes")
    parser.add_argument("--one", nargs=2, type=int, metavar=("CROP", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.classes)))
        return 0
    print(f"# {platform.node()} · {platform.processor() or platform.machine()} · python {platform.python_version()}")
    print(f"{'crop':>5} {'batch':>5} {'classes':>7} {'estimate MiB':>13} {'measured MiB':>13} "
          f"{'estimate/measured':>18}")
    for crop in args.crops:
        for batch in args.batches:
            extra = [] if args.classes is None else ["--classes", str(args.classes)]
            out = subprocess.run([sys.executable, __file__, "--one", str(crop), str(batch), *extra],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['crop']:>5} {r['batch']:>5} {r['classes']:>7} {r['estimate'] / 2**20:13.0f} "
                  f"{r['measured'] / 2**20:13.0f} {r['estimate'] / max(1, r['measured']):18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
