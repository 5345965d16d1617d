"""Memory guard: estimate a job's peak memory before it runs, then shrink its batch or refuse.

A job has a *fixed* part (full-size result buffers, on the host) and a *per-item* part (one
image or tile through the network, on the compute device). ``plan_batch`` returns the largest
batch that fits, or raises :class:`MemoryBudgetError` with the figures when not even one item
fits, instead of letting the operating system kill the process (or CUDA raise out-of-memory
half-way through).

The budget is the free memory (``engine.tiling.available_memory``: MemAvailable capped by the
cgroup limit, or free CUDA memory) times ``fraction``; ``$FINEMASK_MEMORY_LIMIT`` (bytes, or with
a K/M/G suffix) caps host memory further, for shared machines and for tests.

Jobs running at once (a server with several job slots) plan with each other: inside
:func:`job_reservation` the peak a job planned stays reserved until it ends, and ``free_bytes``
subtracts the reservations of the other running jobs. Free memory already shows what they have
allocated so far, so this counts that part twice: the guard errs on the side of refusing.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import threading
from collections.abc import Iterator

import torch
from torch import nn

from . import tiling
from .errors import FineMaskError

#: Share of free memory a job may plan to use; the rest is slack for the allocator and others.
FRACTION = 0.8
_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryBudgetError(FineMaskError):
    """A job would need more memory than is free; the message gives both figures."""


def memory_limit() -> int | None:
    """``$FINEMASK_MEMORY_LIMIT`` in bytes (``"2G"``, ``"512M"``, ``"1000000"``), or None."""
    raw = os.environ.get("FINEMASK_MEMORY_LIMIT", "").strip().lower().removesuffix("b")
    if not raw:
        return None
    scale = _SUFFIXES.get(raw[-1], 1)
    number = raw[:-1] if raw[-1] in _SUFFIXES else raw
    try:
        return int(float(number) * scale)
    except ValueError:
        raise FineMaskError(f"FINEMASK_MEMORY_LIMIT must be a size like 2G or 512M, got {raw!r}") from None


def free_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes a job may still allocate on ``device`` (host memory also capped by the limit), less
    what the other running jobs have reserved (:func:`job_reservation`)."""
    device = torch.device(device)
    free = tiling.available_memory(device)
    limit = memory_limit()
    if device.type == "cpu" and limit is not None:
        free = min(free, limit)
    return max(0, free - reserved_bytes(device))


# --------------------------------------------------------------------------------------------
# Memory reserved by running jobs (process-wide)

_jobs_lock = threading.Lock()
_jobs: dict[int, dict[str, int]] = {}  # job id -> {device type: bytes planned}
_job_ids = itertools.count(1)
_current_job: contextvars.ContextVar[int | None] = contextvars.ContextVar("finemask_memory_job", default=None)


@contextlib.contextmanager
def job_reservation() -> Iterator[None]:
    """The scope of one job: what its ``plan_batch`` calls plan stays reserved until it ends.

    The reservation is the largest plan per device (a job's steps run one after the other).
    Plans made outside any scope reserve nothing but still see the running jobs' reservations.
    """
    job = next(_job_ids)
    with _jobs_lock:
        _jobs[job] = {}
    token = _current_job.set(job)
    try:
        yield
    finally:
        _current_job.reset(token)
        with _jobs_lock:
            _jobs.pop(job, None)


def reserved_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes on ``device``'s kind of memory reserved by running jobs other than the caller's."""
    kind, me = torch.device(device).type, _current_job.get()
    with _jobs_lock:
        return sum(plans.get(kind, 0) for job, plans in _jobs.items() if job != me)


def _reserve(kind: str, nbytes: int) -> None:
    job = _current_job.get()
    if job is None:
        return
    with _jobs_lock:
        plans = _jobs.get(job)
        if plans is not None:
            plans[kind] = max(plans.get(kind, 0), int(nbytes))


def plan_batch(*, fixed_bytes: int, item_bytes: int, wanted: int, device: torch.device | str,
               what: str, unit: str = "image", hint: str = "", fraction: float = FRACTION) -> int:
    """Largest batch in 1..``wanted`` whose estimated peak fits; raises when even 1 does not.

    ``fixed_bytes`` live on the host (full-size buffers); ``item_bytes`` per batch item on
    ``device`` (``unit`` names an item in the message). On the CPU both come out of the same budget.
    """
    device = torch.device(device)
    host = int(free_bytes("cpu") * fraction)
    if fixed_bytes > host:
        raise MemoryBudgetError(
            f"{what} needs about {_gib(fixed_bytes + item_bytes)} of memory but only {_gib(host)} can be "
            f"used now{'; ' + hint if hint else ''}")
    room = host - fixed_bytes if device.type == "cpu" else int(free_bytes(device) * fraction)
    fits = room // max(1, int(item_bytes))
    if fits < 1:
        where = "memory" if device.type == "cpu" else f"{device.type.upper()} memory"
        raise MemoryBudgetError(
            f"{what} needs about {_gib(item_bytes)} of {where} for one {unit} "
            f"but only {_gib(room)} is free"
            f"{'; ' + hint if hint else ''}")
    batch = max(1, min(int(wanted), int(fits)))
    if device.type == "cpu":
        _reserve("cpu", fixed_bytes + batch * int(item_bytes))
    else:
        _reserve("cpu", fixed_bytes)
        _reserve(device.type, batch * int(item_bytes))
    return batch


def activation_bytes_per_pixel(model: nn.Module, *inputs: torch.Tensor) -> float:
    """Working bytes per input pixel of ``model``, from one probe forward on small ``inputs``.

    Estimate: four times the largest (inputs + output) of any leaf layer, as float32 - room for
    the skip features kept across a decoder and for allocator slack (three times undershot the
    measured peak of a light-refiner tile by about 10%: ``bench/memory_guard.py``). Activations
    scale with the pixel count, so the figure carries over to full-size inputs.
    """
    sizes: list[int] = []

    def hook(_mod, args, output):
        tensors = [x for x in args if isinstance(x, torch.Tensor)]
        out = output.numel() if isinstance(output, torch.Tensor) else 0
        sizes.append(sum(x.numel() for x in tensors) + out)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    pixels = inputs[0].shape[0] * inputs[0].shape[-2] * inputs[0].shape[-1]
    return 4 * 4.0 * (max(sizes) if sizes else 0) / pixels


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"
