"""Memory of this process: how much is resident (Linux /proc), for benchmarks, tests and memory
guards, and how glibc's allocator keeps or returns freed memory (``mallopt`` / ``malloc_trim``,
the one place FineMask calls them; each is a no-op where the C library is not glibc).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import sys
import threading
from collections.abc import Iterator
from typing import Any


def current_rss() -> int:
    """Bytes resident now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident bytes of this process image.

    Reads ``VmHWM``, which starts afresh at ``exec``; ``ru_maxrss`` (the fallback off Linux)
    keeps the peak of the process that forked us, so a child of a large pytest process would
    report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Set the peak to the current resident size (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# glibc's allocator.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
# Setting any of the first three turns off glibc's dynamic mmap threshold for good, so on exit
# reuse_freed_memory sets the values that dynamic adjustment converges to (32 MiB threshold,
# trim at twice that).
_GLIBC_AFTER = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_reuse_lock = threading.Lock()
_reuse_depth = 0


@functools.cache
def glibc() -> Any | None:
    """The C library through ``ctypes`` when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - probe: glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give memory freed by a finished job back to the system (glibc's ``malloc_trim``).

    Without it glibc keeps the freed pages of a big image's arrays, and an idle server stays at
    its peak size; see docs/RELIABILITY.md.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as ``MALLOC_ARENA_MAX`` does; call it before any thread starts.

    A server running each job on one of many worker threads gets an arena per thread from glibc
    (up to 8 per core), each keeping freed memory of the big jobs it ran: the RSS then climbs job
    after job. Two arenas keep it flat (docs/RELIABILITY.md, bench/web_load.py). Does nothing
    (False) where ``MALLOC_ARENA_MAX`` is set.
    """
    libc = glibc()
    if os.environ.get("MALLOC_ARENA_MAX") or libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, glibc serves large tensors from its heap instead of fresh mmaps.

    Why: PyTorch frees and re-allocates every activation; glibc maps allocations over 32 MiB
    afresh each time, and the page faults of first touch made full-resolution layers of a
    900 x 900 tile 2-4x slower than their arithmetic (measured on the 2-core benchmark machine).
    Peak memory is unchanged; on exit the defaults are restored and the heap is trimmed.
    Nested and concurrent uses are counted so the last one out restores.
    """
    global _reuse_depth
    libc = glibc() if enabled else None
    if libc is None:
        yield
        return
    with _reuse_lock:
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _reuse_depth += 1
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                for param, value in _GLIBC_AFTER.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
