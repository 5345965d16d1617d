"""Resident memory of this process, for benchmarks, tests and memory guards (Linux /proc)."""
from __future__ import annotations

import os
import resource


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
