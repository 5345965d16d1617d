"""Command-line launch of training runs, single process or under ``torchrun``.

``finemask train dsrl|refine ...`` / ``finemask finetune ...`` and ``torchrun --nproc-per-node N
-m training dsrl|refine|finetune ...`` share these parsers. Under torchrun each process joins the
process group (NCCL on GPUs, gloo on CPU) and the loop splits every global batch over the ranks;
rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.models.config import VARIANTS

from .data.refine_crops import REFINE_SOURCES
from .loop import LoopConfig


def init_distributed() -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``train dsrl``."""
    parser.add_argument("--data", default="camvid", help="dataset name (camvid, dubai, idrid)")
    parser.add_argument("--variant", default="dsrl", choices=list(VARIANTS))
    parser.add_argument("--encoder", default="mobile", choices=["mobile", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    parser.add_argument("--crop", type=int, nargs=2, default=[352, 480], metavar=("H", "W"),
                        help="HR (output-size) crop; the network input is half of it")
    parser.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                        help="random rescaling of training images")
    parser.add_argument("--data-scale", type=float, default=1.0, help="rescale the dataset's images first")
    parser.add_argument("--sr-channels", type=int, default=None, help="width of the SISR decoder")
    parser.add_argument("--class-weighting", default="none", choices=["none", "median", "enet"],
                        help="cross-entropy class weights: none (DSRL), median-frequency or ENet's 1/ln(1.02+p)")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over processes)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--schedule", default="poly", choices=["poly", "step"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                        help="stop this sitting after MIN minutes with a checkpoint (--resume continues)")
    parser.add_argument("--run", dest="run_dir", type=Path, default=None,
                        help="run folder (default runs/<data>-<variant>)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    parser.add_argument("--pretrained", default=None, metavar="NAME|FILE",
                        help="start the encoder from ImageNet ResNet weights: an installed name "
                             "(resnet50-imagenet) or a torchvision-layout file; not applied on --resume")


def _setup(args: argparse.Namespace) -> tuple[int, LoopConfig]:
    """Join torchrun's group, set threads, and build the loop config shared by every job."""
    rank, _ = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    loop = LoopConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        schedule=args.schedule, seed=args.seed, ckpt_every=args.ckpt_every, num_workers=args.workers,
        time_budget_s=None if args.time_budget is None else 60 * args.time_budget,
    )
    return rank, loop


def _command_line() -> str:
    entry = "python -m training" if sys.argv[0].endswith("__main__.py") else "finemask"
    return " ".join([entry, *sys.argv[1:]])


def _advance(bar: Any, step: int) -> None:
    """Move a tqdm bar to the absolute ``step`` (each loop step reports one).

    The first report of a resumed run restarts the bar's clock at that step, so its rate and ETA
    count this sitting's steps only, not the ones an earlier sitting did.
    """
    if bar.n == 0 and step > 1:
        bar.reset(total=bar.total)
        bar.initial = bar.n = bar.last_print_n = step - 1
    bar.update(step - bar.n)


def _train_with_bar(train, cfg, run: Path, args: argparse.Namespace, rank: int, desc: str) -> int:
    """Run ``train(cfg, run, resume=..., on_progress=...)`` with a tqdm bar and a summary on rank 0."""
    from tqdm import tqdm

    bar = tqdm(total=args.steps, desc=desc, unit="step", disable=rank != 0)

    def progress(step: int, total: int, message: str) -> None:
        _advance(bar, step)
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    _, result = train(cfg, run, resume=args.resume, on_progress=progress)
    bar.close()
    if rank == 0:
        state = "finished" if result.finished else "stopped (resume with --resume)"
        print(f"{state} at step {result.step}/{args.steps}, loss {result.last_loss:.4f}; run folder {run}")
    return 0


def run_dsrl(args: argparse.Namespace) -> int:
    """Train (or resume) a DSRL run with a progress bar on rank 0."""
    from .train_dsrl import DSRLTrainConfig, train_dsrl

    rank, loop = _setup(args)
    model_overrides = {} if args.sr_channels is None else {"sr_channels": args.sr_channels}
    cfg = DSRLTrainConfig(
        data=args.data, variant=args.variant, encoder=args.encoder, output_stride=args.output_stride,
        crop=tuple(args.crop), scale_range=tuple(args.scale_range), data_scale=args.data_scale,
        model=model_overrides, class_weighting=args.class_weighting, loop=loop, command=_command_line(),
        pretrained=args.pretrained,
    )
    run = args.run_dir or Path("runs") / f"{args.data}-{args.variant}"
    return _train_with_bar(train_dsrl, cfg, run, args, rank, f"train {args.variant}")


def _probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``train refine``."""
    parser.add_argument("--backbone", default="light", choices=["light", "resnet50"])
    parser.add_argument("--mask-skip", action="store_true",
                        help="give the OS1 decoder stage the full-resolution input mask (not in the paper)")
    parser.add_argument("--sources", nargs="+", default=list(REFINE_SOURCES))
    parser.add_argument("--crops-per-epoch", type=int, default=10000)
    parser.add_argument("--lowres-prob", type=_probability, default=0.0,
                        help="share of coarse masks made by shrinking and enlarging the ground truth "
                             "(2-8x) instead of CascadePSP's perturbation (not in the paper)")
    parser.add_argument("--steps", type=int, default=45000)
    parser.add_argument("--batch-size", type=int, default=12, help="global batch (split over processes)")
    parser.add_argument("--lr", type=float, default=2.25e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--schedule", default="step", choices=["poly", "step"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN")
    parser.add_argument("--run", dest="run_dir", type=Path, default=Path("runs") / "refine")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pretrained", default=None, metavar="NAME|FILE",
                        help="start the backbone (--backbone resnet50) from ImageNet ResNet-50 weights: "
                             "resnet50-imagenet or a torchvision-layout file; not applied on --resume")


def run_refine(args: argparse.Namespace) -> int:
    """Train (or resume) the refinement module with a progress bar on rank 0."""
    from .train_refine import RefineTrainConfig, train_refine

    rank, loop = _setup(args)
    cfg = RefineTrainConfig(backbone=args.backbone, sources=tuple(args.sources),
                            crops_per_epoch=args.crops_per_epoch, lowres_prob=args.lowres_prob,
                            loop=loop, command=_command_line(),
                            model={"mask_skip": True} if args.mask_skip else {}, pretrained=args.pretrained)
    return _train_with_bar(train_refine, cfg, args.run_dir, args, rank, f"train refine-{args.backbone}")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``finetune`` (``finemask finetune`` and ``python -m training finetune``)."""
    parser.add_argument("store", type=Path, help="annotation store folder")
    parser.add_argument("--base", default="camvid", help="shipped model name or model folder to start from")
    parser.add_argument("--steps", type=int, default=300, help="step budget")
    parser.add_argument("--minutes", type=float, default=None, help="time budget for training (ends the run normally)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (split over processes)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--crop", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="training crop at the model's output scale (segmentation models)")
    parser.add_argument("--ignore-index", type=int, default=255,
                        help="label value of unlabelled pixels (255, the store's convention; -1: none)")
    parser.add_argument("--name", default=None, help="name of the new version (default <base>-ftN)")
    parser.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="new working size of a segmenter (default: the base model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5, help="steps between rows of the loss log")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune with a progress bar; under torchrun rank 0 reports and writes the version."""
    from tqdm import tqdm

    from .finetune import FinetuneConfig, finetune

    rank, _ = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(steps=args.steps, time_budget_s=None if args.minutes is None else 60 * args.minutes,
                         batch_size=args.batch_size, lr=args.lr, crop=tuple(args.crop), seed=args.seed,
                         ignore_index=None if args.ignore_index < 0 else args.ignore_index, name=args.name,
                         log_every=args.log_every,
                         input_size=None if args.input_size is None else tuple(args.input_size))
    bar = tqdm(total=args.steps, unit="step", desc="fine-tune", disable=rank != 0)

    def progress(done: int, total: int, message: str) -> None:
        if message.startswith("step "):
            bar.total = total
            _advance(bar, done)
            bar.set_description_str("fine-tune", refresh=False)
            bar.set_postfix_str(message.split(" · ", 1)[1], refresh=False)
        else:
            bar.set_description_str(message, refresh=False)
        bar.refresh()

    result = finetune(args.store, args.base, cfg, on_progress=progress, resume=not args.fresh)
    bar.close()
    if rank != 0:
        return 0
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
