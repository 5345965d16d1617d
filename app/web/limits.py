"""Limits of the web app that no request may get around: job slots, uploads, fine-tuning budgets.

- :class:`JobGate`: every model job (segment, refine, apply a correction, save, fine-tune) holds
  one of ``slots`` places while it runs, whatever route it came in by; at most ``waiting`` more
  wait for one, and any beyond that are refused at once ("Queue is full"). Gradio's queue admits
  the same numbers, so behind it the gate never blocks; it is the backstop for anything that
  reaches a model function another way. Each job also opens a memory reservation
  (``engine.memory_guard.job_reservation``), so jobs running side by side plan with each other.
- :class:`UploadLimit`: an ASGI middleware that refuses an upload request (``/gradio_api/upload``)
  carrying more than ``max_files`` files or ``max_bytes`` bytes (HTTP 413 with the reason), before
  Gradio stores more than that.
- :func:`finetune_budget`: the step and minute budget of one fine-tuning request, refused above
  the server's caps.

No Gradio import: refusals are ``FineMaskError`` (the server shows their text).
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import FineMaskError
from engine.memory_guard import job_reservation

UPLOAD_PATH = "/gradio_api/upload"


class QueueFull(FineMaskError):
    """Every job slot is taken and the waiting line is full: the request was not run."""


@dataclass(frozen=True)
class RequestLimits:
    """Per-request caps (``python -m app.web --help``).

    ``max_upload_files`` / ``max_upload_bytes``: files and bytes in one upload request (None:
    the bytes cap follows the largest file, see :func:`upload_bytes_cap`).
    ``max_finetune_steps`` / ``max_finetune_minutes``: budget of one fine-tuning request; a
    request without a time budget gets the cap.
    """

    max_upload_files: int = 8
    max_upload_bytes: int | None = None
    max_finetune_steps: int = 2000
    max_finetune_minutes: float = 30.0


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "k": 1 << 10, "mb": 1 << 20, "m": 1 << 20, "gb": 1 << 30, "g": 1 << 30,
          "tb": 1 << 40, "t": 1 << 40}


def parse_size(size: str | int | None) -> int | None:
    """Bytes of a size such as ``"500mb"``, ``"2 GB"``, ``"1048576"`` (units of 1024, as Gradio's)."""
    if size is None or isinstance(size, int):
        return size
    text = str(size).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtb")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0:
        raise FineMaskError(f"not a size: {size!r} (examples: 500mb, 2gb, 1048576)")
    return int(value * _UNITS[unit])


def upload_bytes_cap(limits: RequestLimits, max_file_size: int | None) -> int | None:
    """Bytes one upload request may carry: the configured cap, else the largest file plus 32 MiB
    (room for the multipart framing and the correction editor's small layers), else no cap."""
    if limits.max_upload_bytes is not None:
        return int(limits.max_upload_bytes)
    return None if max_file_size is None else int(max_file_size) + (32 << 20)


# --------------------------------------------------------------------------------------------
# Job slots


class JobGate:
    """At most ``slots`` jobs run at once; at most ``waiting`` wait; the rest are refused.

    ``refuse`` makes the exception raised for a refused job from its message (default
    :class:`QueueFull`). ``running`` and ``peak`` (most jobs ever running at once) are for tests
    and monitoring.
    """

    def __init__(self, slots: int, waiting: int, refuse: Callable[[str], Exception] = QueueFull):
        self.slots, self.waiting, self.refuse = max(1, int(slots)), max(0, int(waiting)), refuse
        self.running = self.peak = self._queued = 0
        self._cond = threading.Condition()

    def acquire(self) -> None:
        """Take a slot, waiting in line if there is room in it; raise :class:`QueueFull` if not."""
        with self._cond:
            if self.running >= self.slots:
                if self._queued >= self.waiting:
                    raise self.refuse(f"Queue is full: {self.running} job(s) running and {self._queued} waiting "
                                    f"(the server runs {self.slots} at a time and lets {self.waiting} wait). "
                                    "Please try again later.")
                self._queued += 1
                try:
                    while self.running >= self.slots:
                        self._cond.wait()
                finally:
                    self._queued -= 1
            self.running += 1
            self.peak = max(self.peak, self.running)

    def release(self) -> None:
        with self._cond:
            self.running -= 1
            self._cond.notify()

    def guard(self, fn: Callable) -> Callable:
        """``fn`` run holding a slot and inside a memory reservation (keeps ``fn``'s signature for Gradio)."""

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.acquire()
            try:
                with job_reservation():
                    return fn(*args, **kwargs)
            finally:
                self.release()

        return guarded


# --------------------------------------------------------------------------------------------
# Fine-tuning budget


def finetune_budget(steps: int | None, minutes: float | None, limits: RequestLimits,
                    default_steps: int) -> tuple[int, float]:
    """(steps, minutes) for one fine-tuning request: ``steps`` None means the server's default,
    ``minutes`` 0 or None means the cap; a FineMaskError names the cap that was passed."""
    max_steps, max_minutes = int(limits.max_finetune_steps), float(limits.max_finetune_minutes)
    wanted = min(int(default_steps), max_steps) if steps is None else int(steps)
    if wanted > max_steps:
        raise FineMaskError(f"fine-tuning asks for {wanted} steps; this server allows at most {max_steps} "
                            "per request (--max-finetune-steps)")
    if wanted < 1:
        raise FineMaskError(f"the step budget must be at least 1, got {wanted}")
    budget = float(minutes or 0)
    if budget < 0 or budget != budget:
        raise FineMaskError(f"the time budget must be 0 (none given) or a positive number of minutes, got {minutes}")
    if budget > max_minutes:
        raise FineMaskError(f"fine-tuning asks for {budget:g} minutes; this server allows at most {max_minutes:g} "
                            "per request (--max-finetune-minutes)")
    return wanted, budget or max_minutes


# --------------------------------------------------------------------------------------------
# Upload size


def _boundary(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"content-type":
            for param in value.split(b";")[1:]:
                key, _, val = param.strip().partition(b"=")
                if key.lower() == b"boundary" and val:
                    return val.strip(b'"')
    return None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class UploadLimit:
    """ASGI middleware: an upload request with more than ``max_files`` files or ``max_bytes`` bytes
    is refused with HTTP 413 and the reason.

    A declared Content-Length over the cap is refused before any byte is read. Otherwise the
    body is counted as it streams to Gradio (bytes, and multipart boundaries: one per part):
    the chunk that would pass a cap is not handed on; Gradio's parser gets a
    ``MultiPartException`` instead, removes the files it had started and answers 413.
    """

    def __init__(self, app: Any, max_files: int | None, max_bytes: int | None, path: str = UPLOAD_PATH):
        self.app, self.max_files, self.max_bytes, self.path = app, max_files, max_bytes, path.rstrip("/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path", "").rstrip("/") != self.path):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        declared = _content_length(headers)
        if self.max_bytes is not None and declared is not None and declared > self.max_bytes:
            await _refuse(send, self._bytes_message(declared))
            return
        await self.app(scope, self._counting(receive, _boundary(headers)), send)

    def _bytes_message(self, size: int) -> str:
        return (f"Upload refused: the request carries {size:,} bytes, over the maximum allowed size of "
                f"{self.max_bytes:,} bytes per request (--max-upload-bytes).")

    def _counting(self, receive: Callable, boundary: bytes | None) -> Callable:
        from starlette.formparsers import MultiPartException

        marker = b"--" + boundary if boundary else None
        state = {"bytes": 0, "markers": 0, "tail": b""}

        async def counted() -> dict:
            message = await receive()
            if message.get("type") != "http.request":
                return message
            body = message.get("body", b"")
            state["bytes"] += len(body)
            if self.max_bytes is not None and state["bytes"] > self.max_bytes:
                raise MultiPartException(self._bytes_message(state["bytes"]))
            if marker is not None and self.max_files is not None:
                window = state["tail"] + body
                state["markers"] += window.count(marker)
                # keep what could be the start of a marker split over two chunks (never a whole one)
                state["tail"] = window[-(len(marker) - 1):] if len(marker) > 1 else b""
                parts = state["markers"] - 1  # the last marker closes the body
                if parts > self.max_files:
                    raise MultiPartException(
                        f"Upload refused: more than {self.max_files} files in one request, over the maximum "
                        f"allowed size of {self.max_files} files per request (--max-upload-files).")
            return message

        return counted


async def _refuse(send: Callable, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["JobGate", "QueueFull", "RequestLimits", "UploadLimit", "finetune_budget", "parse_size",
           "upload_bytes_cap"]
