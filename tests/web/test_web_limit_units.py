"""The web app's limits without a server: the job gate, the fine-tuning budget, the upload
middleware (chunks split anywhere), the command-line options."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.web.limits import JobGate, QueueFull, RequestLimits, UploadLimit, finetune_budget, parse_size, upload_bytes_cap
from engine import memory_guard
from engine.errors import FineMaskError


def test_gate_runs_one_job_lets_two_wait_and_refuses_the_rest():
    gate = JobGate(1, 2)
    release, inside, peak, lock = threading.Event(), [0], [0], threading.Lock()

    @gate.guard
    def job():
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        release.wait(10)
        with lock:
            inside[0] -= 1
        return "done"

    results = []
    threads = [threading.Thread(target=lambda: results.append(job())) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while (gate.running, gate._queued) != (1, 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (gate.running, gate._queued) == (1, 2)
    with pytest.raises(QueueFull, match="Queue is full: 1 job.* running and 2 waiting"):
        job()
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["done"] * 3 and peak[0] == 1
    assert gate.running == 0 and gate.peak == 1
    assert job() == "done"  # room again


def test_gate_refusal_can_be_any_exception_and_a_failed_job_frees_its_slot():
    gate = JobGate(1, 0, refuse=lambda text: RuntimeError(text))

    @gate.guard
    def failing():
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        failing()
    assert gate.running == 0
    gate.acquire()
    try:
        with pytest.raises(RuntimeError, match="Queue is full"):
            gate.acquire()
    finally:
        gate.release()


def test_guarded_jobs_plan_memory_with_each_other(monkeypatch):
    monkeypatch.delenv("FINEMASK_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(memory_guard.tiling, "available_memory", lambda device="cpu": 1000 << 20)
    gate = JobGate(2, 0)
    planned, seen = threading.Event(), []

    @gate.guard
    def big_job():
        memory_guard.plan_batch(fixed_bytes=700 << 20, item_bytes=1, wanted=1, device="cpu", what="x", fraction=1)
        planned.set()
        time.sleep(0.5)

    @gate.guard
    def other_job():
        seen.append(memory_guard.free_bytes("cpu"))

    runner = threading.Thread(target=big_job)
    runner.start()
    assert planned.wait(10)
    other_job()
    runner.join(10)
    assert seen == [(1000 << 20) - (700 << 20) - 1]
    other_job()
    assert seen[-1] == 1000 << 20


@pytest.mark.parametrize("steps, minutes, want", [(None, 0, (100, 30.0)), (2000, 30, (2000, 30.0)),
                                                   (5, None, (5, 30.0)), (1, 0.5, (1, 0.5))])
def test_finetune_budget_within_the_caps(steps, minutes, want):
    assert finetune_budget(steps, minutes, RequestLimits(), default_steps=100) == want


def test_finetune_default_steps_are_capped_not_refused():
    assert finetune_budget(None, 0, RequestLimits(max_finetune_steps=10), default_steps=100) == (10, 30.0)


@pytest.mark.parametrize("steps, minutes, message", [(10 ** 9, 0, "at most 2000 .*--max-finetune-steps"),
                                                     (2001, 0, "2001 steps"), (0, 0, "at least 1"),
                                                     (10, 30.5, "at most 30 .*--max-finetune-minutes"),
                                                     (10, -1, "time budget"), (10, float("nan"), "time budget")])
def test_finetune_budget_refuses_beyond_the_caps(steps, minutes, message):
    with pytest.raises(FineMaskError, match=message):
        finetune_budget(steps, minutes, RequestLimits(), default_steps=100)


def test_sizes():
    assert parse_size("500mb") == 500 << 20 and parse_size("2 GB") == 2 << 30 and parse_size("1048576") == 1 << 20
    assert parse_size(None) is None and parse_size(7) == 7
    for bad in ("lots", "-1mb", "5xb"):
        with pytest.raises(FineMaskError, match="not a size"):
            parse_size(bad)
    assert upload_bytes_cap(RequestLimits(), 500 << 20) == (500 << 20) + (32 << 20)
    assert upload_bytes_cap(RequestLimits(max_upload_bytes=1000), 500 << 20) == 1000
    assert upload_bytes_cap(RequestLimits(), None) is None


def multipart(n_files: int, size: int, boundary: bytes = b"XyZ") -> bytes:
    parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="f%d"\r\n\r\n' % i
             + b"a" * size + b"\r\n" for i in range(n_files)]
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


def call_middleware(body: bytes, chunk: int, *, max_files=None, max_bytes=None, length=True,
                    path="/gradio_api/upload"):
    """Run UploadLimit over an app that reads the whole body; (status, text, bytes the app got, error)."""
    got, sent = bytearray(), []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            got.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=XyZ")]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    error = None
    try:
        asyncio.run(UploadLimit(app, max_files=max_files, max_bytes=max_bytes)(scope, receive, send))
    except Exception as exc:  # noqa: BLE001 - what Gradio's parser would turn into a 413
        error = exc
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    return status, text, bytes(got), error


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100_000])
def test_file_count_is_found_however_the_body_is_split(chunk):
    body = multipart(4, 50)
    assert call_middleware(body, chunk, max_files=4)[0] == 200
    status, _, got, error = call_middleware(multipart(5, 50), chunk, max_files=4)
    assert status is None and "more than 4 files" in str(error) and "--max-upload-files" in str(error)
    assert got.count(b"--XyZ") <= 5  # the closing marker of the fifth file never reached the app


def test_bytes_are_capped_declared_or_streamed():
    body = multipart(1, 5000)
    status, text, got, _ = call_middleware(body, 1000, max_bytes=4000)
    assert status == 413 and "--max-upload-bytes" in text and got == b""  # refused before reading
    status, _, got, error = call_middleware(body, 1000, max_bytes=4000, length=False)
    assert "maximum allowed size" in str(error) and len(got) <= 4000
    assert call_middleware(body, 1000, max_bytes=len(body))[0] == 200


def test_other_routes_pass_untouched():
    status, _, got, _ = call_middleware(multipart(50, 10), 64, max_files=1, max_bytes=10, path="/gradio_api/queue/join")
    assert status == 200 and got == multipart(50, 10)


def test_command_line_limits():
    from app.web.server import limits_from_args, parse_args

    limits = limits_from_args(parse_args([]))
    assert limits == RequestLimits()
    limits = limits_from_args(parse_args(["--max-upload-files", "2", "--max-upload-bytes", "10mb",
                                          "--max-finetune-steps", "50", "--max-finetune-minutes", "1.5"]))
    assert limits == RequestLimits(2, 10 << 20, 50, 1.5)
    with pytest.raises(FineMaskError, match="--max-finetune-steps must be positive"):
        limits_from_args(parse_args(["--max-finetune-steps", "0"]))
