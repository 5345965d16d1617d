"""``python -m app.web``: start the FineMask web app (see ``--help``)."""
import ctypes
import os
import sys


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as ``MALLOC_ARENA_MAX`` does; call it before any thread starts.

    Gradio runs each job on one of many worker threads and glibc gives threads their own arenas
    (up to 8 per core), each keeping freed memory of the big jobs it ran: the server's RSS then
    climbs job after job. Two arenas keep it flat (docs/RELIABILITY.md, bench/web_load.py).
    Does nothing where ``MALLOC_ARENA_MAX`` is set or the C library is not glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


limit_malloc_arenas()  # before the import below: gradio starts threads as it loads

from .server import main

raise SystemExit(main())
