"""Writer process for the annotation-store tests (run as a subprocess, never imported by pytest).

Crash mode::

    python store_crash_writer.py STORE add|update|undo CRASH_AT

performs one store operation and kills itself with SIGKILL just before file-system step number
CRASH_AT (0-based). Steps are every ``os.replace``/``os.rename``/``os.unlink``/``os.remove``
(counted before they happen) and every ``tempfile.mkstemp`` (counted after the empty temporary
file exists), i.e. every point between two changes on disk. CRASH_AT = -1 never crashes; the
process then prints ``steps <n>``, the number of steps the operation took.

Two-writer mode::

    python store_crash_writer.py STORE hammer NAME N GO_FILE

says it is ready (touches GO_FILE.NAME.ready), waits until GO_FILE exists, then N times adds
a pair ``NAME-i`` and updates the pair ``shared`` with model_version ``NAME-i``.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.store import Store  # noqa: E402

_step = 0


def _die() -> None:
    sys.stdout.flush()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


def _count(crash_at: int) -> None:
    global _step
    if _step == crash_at:
        _die()
    _step += 1


def install_crash_points(crash_at: int) -> None:
    """Wrap the file-system calls the store makes so the process dies at step ``crash_at``."""
    for name in ("replace", "rename", "unlink", "remove"):
        real = getattr(os, name)

        def before(*args, _real=real, **kwargs):
            _count(crash_at)
            return _real(*args, **kwargs)

        setattr(os, name, before)
    real_mkstemp = tempfile.mkstemp

    def after_mkstemp(*args, **kwargs):
        result = real_mkstemp(*args, **kwargs)
        _count(crash_at)
        return result

    tempfile.mkstemp = after_mkstemp


def labels_for(shape: tuple[int, int], value: int) -> np.ndarray:
    """A deterministic label map: stripes of ``value`` and ``value + 1``."""
    labels = np.full(shape, value, dtype=np.uint16)
    labels[:, ::3] = value + 1
    return labels


def crash_mode(root: Path, op: str, crash_at: int) -> None:
    store = Store.open(root, create=False, lock_timeout=10)
    shape = store.get(store.ids()[0]).shape
    install_crash_points(crash_at)
    if op == "add":
        image = np.random.default_rng(7).integers(0, 256, (*shape, 3), dtype=np.uint8)
        store.add(image, labels_for(shape, 5), "predicted", model_version="crash-test", name="c")
    elif op == "update":
        store.update("a", labels_for(shape, 7), origin="corrected")
    elif op == "undo":
        store.undo("a")
    else:
        raise SystemExit(f"unknown operation {op!r}")
    print(f"steps {_step}", flush=True)


def hammer_mode(root: Path, name: str, n: int, go_file: Path) -> None:
    store = Store.open(root, create=False, lock_timeout=30)
    shape = store.get("shared").shape
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    Path(f"{go_file}.{name}.ready").touch()
    deadline = time.monotonic() + 20
    while not go_file.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(n):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        store.add(image, labels_for(shape, i), "predicted", model_version=f"{name}-{i}", name=f"{name}-{i}")
        store.update("shared", labels_for(shape, i), model_version=f"{name}-{i}")
    print("done", flush=True)


def main(argv: list[str]) -> None:
    root, op = Path(argv[1]), argv[2]
    if op == "hammer":
        hammer_mode(root, argv[3], int(argv[4]), Path(argv[5]))
    else:
        crash_mode(root, op, int(argv[3]))


if __name__ == "__main__":
    main(sys.argv)
