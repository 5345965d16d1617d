"""Checks of the options every command may have (``--device``, ``--threads``, worker counts),
before any work: a bad value is one FineMaskError naming the option (the CLI: exit code 2)."""
from __future__ import annotations

import argparse

from engine.errors import FineMaskError

#: Options counting threads or processes: attribute name -> (option as typed, smallest value).
#: ``finemask train --workers 0`` (data loading in the main process) is valid; a cluster needs 1.
COUNT_OPTIONS = {"threads": ("--threads", 1), "workers": ("--workers", 0),
                 "threads_per_worker": ("--threads-per-worker", 1)}


def check_options(args: argparse.Namespace) -> None:
    """Check whichever of ``--device`` and the count options ``args`` has.

    The device is checked on this machine unless the work runs on a remote cluster
    (``--scheduler``), whose workers may have GPUs this machine lacks (only its spelling is checked).
    """
    for attr, (option, least) in COUNT_OPTIONS.items():
        value = getattr(args, attr, None)
        if attr == "workers" and getattr(args, "command", None) == "batch":
            least = 1
        if value is not None and value < least:
            raise FineMaskError(f"{option} must be at least {least}, got {value}")
    device = getattr(args, "device", None)
    if device is not None:
        check_device(device, local=getattr(args, "scheduler", None) is None)


def check_device(value: str, *, option: str = "--device", local: bool = True) -> None:
    """A FineMaskError unless ``value`` names a device FineMask can run on (here, when ``local``)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise FineMaskError(f"{option} {value!r} is not a device: use cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not local:
            return
        if not torch.cuda.is_available():
            raise FineMaskError(f"{option} {value}: CUDA is not available on this machine (no GPU or a CPU-only "
                                "torch build); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FineMaskError(f"{option} {value}: there is no GPU {device.index} (this machine has {count})")
        return
    if device.type == "mps" and (not local or torch.backends.mps.is_available()):
        return
    raise FineMaskError(f"{option} {value}: FineMask runs on cpu or cuda, not on {device.type}")


def add_mode_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """``--mode`` (``engine.refine_modes``, each explained in the help) and the older spellings
    ``--fast`` (= ``--mode fast``) and ``--skip-global`` (= ``--mode local``)."""
    from engine.refine_modes import DEFAULT_MODE, MODE_HELP, REFINE_MODES

    lines = "; ".join(f"{m}: {MODE_HELP[m]}" for m in REFINE_MODES)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--mode", choices=list(REFINE_MODES), default=None,
                       help=f"{prefix}refinement mode (default {DEFAULT_MODE}). {lines}")
    group.add_argument("--fast", action="store_true", help=f"{prefix}same as --mode fast")
    group.add_argument("--skip-global", action="store_true", help=f"{prefix}same as --mode local")


def chosen_mode(args: argparse.Namespace) -> str:
    """The refinement mode ``add_mode_arguments`` options ask for."""
    from engine.refine_modes import DEFAULT_MODE

    if getattr(args, "fast", False):
        return "fast"
    if getattr(args, "skip_global", False):
        return "local"
    return getattr(args, "mode", None) or DEFAULT_MODE
