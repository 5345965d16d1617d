"""A resumable training loop shared by the DSRL and refinement trainers and by fine-tuning.

Exact resume: the data order is a pure function of (seed, epoch), batches are addressed by the
global step, and the model, optimizer, scheduler, RNG states and step are saved together
atomically. Running N steps, stopping and resuming gives the same weights as running N steps at
once (tested). Multi-process (DistributedDataParallel) training splits each global batch over
the ranks; rank 0 alone writes checkpoints and logs.
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from .resume import load_state, rng_state, save_state, set_rng_state
from .sync_bn import globalise_batchnorm

ProgressFn = Callable[[int, int, str], None]
#: loss_fn(model, batch) -> (total loss, {term name: float})
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopConfig:
    """Optimisation schedule and bookkeeping for one run.

    ``batch_size`` is the global batch (split over DDP ranks). ``schedule``: ``"poly"``
    (lr * (1 - step/steps) ** 0.9) or ``"step"`` (x0.1 at 2/3 and at 8/9 of the steps).
    ``time_budget_s`` stops a sitting early with a checkpoint (resume continues it).
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "poly"
    warmup_steps: int = 0
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    time_budget_s: float | None = None
    amp: bool | None = None
    grad_clip: float | None = None
    num_workers: int = 0


@dataclass
class LoopResult:
    step: int
    finished: bool
    last_loss: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields the batches of global steps ``start..steps-1`` as lists of (epoch, index).

    Epoch e's order is ``randperm(n)`` seeded by (seed, e); a step's batch is a fixed slice of it,
    so the order never depends on where a run was interrupted. With ``world > 1`` each rank
    takes every world-th item of the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        self.n, self.bs, self.seed, self.start, self.steps = n, batch_size, seed, start, steps
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, order_epoch = None, -1
        for step in range(self.start, self.steps):
            epoch, b = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                order, order_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            batch = order[b * self.bs : (b + 1) * self.bs]
            yield [(epoch, i) for i in batch[self.rank :: self.world]]


class EpochKeyed(Dataset):
    """Adapts a dataset with ``set_epoch(e)`` and integer indices to ``(epoch, index)`` keys."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def lr_factor(cfg: LoopConfig, step: int) -> float:
    """Multiplier of the base learning rate at ``step``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "poly":
        return warm * (1 - min(step, cfg.steps - 1) / cfg.steps) ** 0.9
    if cfg.schedule == "step":
        return warm * (0.1 ** sum(step >= cfg.steps * f for f in (2 / 3, 8 / 9)))
    raise ValueError(f"unknown schedule {cfg.schedule!r} (poly or step)")


def make_optimizer(params: list, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def train_loop(
    model: torch.nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    cfg: LoopConfig,
    run_dir: str | Path,
    *,
    params: list[torch.nn.Parameter] | list[dict[str, Any]] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    collate_fn: Callable | None = None,
    on_progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> LoopResult:
    """Train ``model`` for ``cfg.steps`` global steps, saving ``run_dir/state`` every ``ckpt_every``.

    ``dataset[(epoch, index)]`` returns one sample (see :class:`EpochKeyed`); ``params`` (a list
    of parameters or of optimizer groups) defaults to all parameters. Under DDP wrap nothing yourself:
    the model is wrapped here. Returns where it stopped; ``finished`` is False after a cancel or
    when the time budget ran out.
    """
    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch_size % world:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {world} processes")
    torch.manual_seed(cfg.seed)
    model.to(device)
    params = list(params if params is not None else model.parameters())
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    step, history, state = 0, [], None
    state_dir = run_dir / "state"
    if resume and (state_dir.exists() or state_dir.with_name(".state.old").exists()):
        state = load_state(state_dir)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state.get("history", []))
    if distributed:  # BatchNorm statistics over the global batch, as one process would see it
        globalise_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False) if distributed else model
    use_amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, step, cfg.steps, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_fn)
    batches = iter(loader)  # draws a base seed from torch's RNG: do it before restoring the RNG
    if state is not None:
        set_rng_state(state["rng"])
    started, last_loss, finished = time.perf_counter(), math.nan, True
    model.train()

    def checkpoint() -> None:
        if _is_main():
            save_state(state_dir, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng_state(), "step": step, "history": history, "config": asdict(cfg),
            })
            write_log(run_dir, history)
            if on_checkpoint is not None:
                on_checkpoint(step)

    for batch in batches:
        stop = (cancel is not None and cancel()) or (
            cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s)
        if distributed:  # every process stops at the same step, or the others would wait forever
            flag = torch.tensor([float(stop)], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            finished = False
            break
        batch = _to_device(batch, device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with autocast:
            loss, parts = loss_fn(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        last_loss = float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            if distributed:  # log the loss of the global batch: the mean of the equal shares
                shared = loss.detach().float().reshape(1).to(device if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(shared)
                last_loss = float(shared) / world
            history.append({"step": step, "loss": last_loss, "lr": opt.param_groups[0]["lr"],
                            "time": round(time.perf_counter() - started, 3), **parts})
        if on_progress is not None:
            on_progress(step, cfg.steps, f"loss {last_loss:.4f}")
        if step % cfg.ckpt_every == 0 and step < cfg.steps:
            checkpoint()
    checkpoint()
    return LoopResult(step, finished and step >= cfg.steps, last_loss, time.perf_counter() - started, history)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def write_log(run_dir: str | Path, history: list[dict[str, float]]) -> None:
    """``run_dir/log.csv`` and ``run_dir/loss.png`` (when matplotlib is installed)."""
    from engine.atomic import atomic_path

    run_dir = Path(run_dir)
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(run_dir / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps = [row["step"] for row in history]
        for key in keys:
            if key == "loss" or key.startswith("loss_"):
                ax.plot(steps, [row.get(key, math.nan) for row in history], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        with atomic_path(run_dir / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
