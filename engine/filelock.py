"""An exclusive lock on a file shared between processes, with a timeout.

Uses ``fcntl.flock`` on POSIX and ``msvcrt.locking`` on Windows. Both locks belong to the open
file (not to the path), so the operating system releases them when the holder dies: a crashed
process never leaves a stale lock behind. Two :class:`FileLock` objects on the same path exclude
each other even inside one process; one object may be re-entered by the thread holding it.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

from .errors import FineMaskError

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class FileLock:
    """Exclusive inter-process lock on ``path`` (created if missing; its content is unused).

    ``timeout`` is in seconds; waiting longer raises :class:`FineMaskError` naming the lock file.
    Use as a context manager: ``with FileLock(folder / ".lock"): ...``.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0, poll: float = 0.02):
        self.path = Path(path)
        self.timeout = float(timeout)
        self.poll = float(poll)
        self._fd: int | None = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (default: the object's) for the lock."""
        timeout = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=max(timeout, 0.0)):
            raise self._timeout_error(timeout)
        if self._depth > 0:  # re-entered by the holding thread
            self._depth += 1
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            self._thread_lock.release()
            raise FineMaskError(f"cannot open lock file ({exc.strerror})", self.path) from None
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                os.close(fd)
                self._thread_lock.release()
                raise self._timeout_error(timeout)
            time.sleep(self.poll)
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        """Release one level of the lock; the file lock goes when the outermost level ends."""
        if self._depth == 0:
            raise RuntimeError("FileLock.release() without acquire()")
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            try:
                _unlock(fd)
            finally:
                os.close(fd)
        self._thread_lock.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _timeout_error(self, timeout: float) -> FineMaskError:
        return FineMaskError(
            f"another process has held this lock for more than {timeout:g} s; if no other FineMask "
            "window or job is using the folder, try again",
            self.path,
        )
