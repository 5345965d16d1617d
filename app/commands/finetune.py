"""``finemask finetune STORE --base MODEL``: fine-tune a model on an annotation store's corrections."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on the corrected labels of an annotation store")
    p.add_argument("store", type=Path, help="annotation store folder")
    p.add_argument("--base", default="camvid", help="shipped model name or model folder to start from")
    p.add_argument("--steps", type=int, default=300, help="step budget")
    p.add_argument("--minutes", type=float, default=None, help="time budget for training (ends the run normally)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--crop", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                   help="training crop at the model's output scale (segmentation models)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value of unlabelled pixels (e.g. 255)")
    p.add_argument("--name", default=None, help="name of the new version (default <base>-ftN)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="new working size of a segmenter (default: the base model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from training.finetune import FinetuneConfig, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(steps=args.steps, time_budget_s=None if args.minutes is None else 60 * args.minutes,
                         batch_size=args.batch_size, lr=args.lr, crop=tuple(args.crop), seed=args.seed,
                         ignore_index=args.ignore_index, name=args.name,
                         input_size=None if args.input_size is None else tuple(args.input_size))
    bar = tqdm(total=args.steps, unit="step", desc="fine-tune")

    def progress(done: int, total: int, message: str) -> None:
        if message.startswith("step "):
            bar.total, bar.n = total, done
            bar.set_description_str("fine-tune", refresh=False)
            bar.set_postfix_str(message.split(" · ", 1)[1], refresh=False)
        else:
            bar.set_description_str(message, refresh=False)
        bar.refresh()

    result = finetune(args.store, args.base, cfg, on_progress=progress, resume=not args.fresh)
    bar.close()
    print(f"validation pairs: {result.before.get('pairs', 0)}")
    for key in ("miou", "mba"):
        print(f"  {key:5s} before {_fmt(result.before.get(key))}  after {_fmt(result.after.get(key))}")
    if result.model_path is None:
        print(f"stopped at step {result.steps}; run the same command again to resume")
        return 1
    print(f"wrote {result.model_path} ({result.steps} steps, {result.seconds:.0f} s)")
    return 0


def _fmt(value) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"
