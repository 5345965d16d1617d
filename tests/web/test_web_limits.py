"""No route gets around the web app's limits: raw HTTP to /run, /call and /queue/join runs at
most ``--concurrency`` model jobs at once and refuses what the queue cannot hold; uploads and
fine-tuning budgets are capped per request; the same for a logged-in user with ``--auth``.

Each server (a tiny segmenter, in this process) runs with ``--queue-size 2 --concurrency 1``.
The segmenter is instrumented: it counts the jobs inside it and holds the first one until the
burst has been answered, so every request arrives while the only slot is taken.
"""
from __future__ import annotations

import threading

import httpx
import pytest

pytest.importorskip("gradio")
from web_testkit import save_png, scene, tiny_models, web_config

from app.web.limits import RequestLimits
from app.web.server import build_app, launch
from bench.web_load import RUN_REFUSED, OutputCheck, RawHttp, fire_raw, plan_requests, raw_call, summarise

QUEUE = 2
N = 6
WORKING_SIZE = 64
LIMITS = RequestLimits(max_upload_files=3, max_upload_bytes=200_000, max_finetune_steps=50, max_finetune_minutes=5)
AUTH = ("ann", "s3cret-pw")
HOLD_S = 30.0


class Instrumented:
    """Wraps the segmenter's ``predict_batch``: counts jobs inside it, holds them until released."""

    def __init__(self, real):
        self.real, self.inside, self.peak, self.calls = real, 0, 0, 0
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.inside += 1
            self.calls += 1
            self.peak = max(self.peak, self.inside)
        try:
            self.release.wait(HOLD_S)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1


@pytest.fixture(scope="module", params=[None, AUTH], ids=["open", "auth"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-limits")
    seg, _ = tiny_models(folder)
    config = web_config(folder / "store", queue_size=QUEUE, concurrency=1, examples=[], auth=request.param)
    images = [save_png(folder / f"scene{i}.png", scene(h, w, seed=i)) for i, (h, w) in enumerate([(48, 72), (64, 40)])]
    demo = build_app(config, model=seg, refiner="no-such-refiner", limits=LIMITS)
    url = launch(demo, block=False)
    try:
        yield demo, url, seg, images, request.param
    finally:
        demo.close()
        demo.finemask.close()


@pytest.fixture()
def instrumented(server, monkeypatch):
    bench = server[0].finemask
    segmenter = bench.registry.load(bench.registry.entry("tiny", "segmentation"))
    probe = Instrumented(segmenter.predict_batch)
    monkeypatch.setattr(segmenter, "predict_batch", probe)
    yield probe
    probe.release.set()


def uploaded(url, images, auth):
    client = RawHttp(url, auth=auth)
    try:
        return dict(zip(images, client.upload(images)))
    finally:
        client.close()


@pytest.mark.parametrize("route", ["call", "join"])
def test_raw_http_bursts_run_one_job_at_a_time_and_refuse_the_surplus(server, instrumented, route, tmp_path):
    demo, url, seg, images, auth = server
    files = uploaded(url, images, auth)
    check = OutputCheck(seg, WORKING_SIZE, images)
    plan = plan_requests(N, images, models_every=0)

    # Hold the first job until every request has been accepted or refused, then let all run.
    sent, lock = [], threading.Lock()

    def on_sent(code):
        with lock:
            sent.append(code)
            if len(sent) == N:
                instrumented.release.set()

    outcomes = fire_raw(url, plan, route, model="tiny", uploaded=files, working_size=WORKING_SIZE, auth=auth,
                        check=check, time_limit_s=60, download_dir=tmp_path, on_sent=on_sent)
    report = summarise(outcomes, 0.0)
    problems = "\n".join(report.failures)
    assert report.completed + report.refused == N, problems
    assert (report.wrong, report.failed, report.http_5xx) == (0, 0, 0), problems
    # one job running and QUEUE waiting at most were accepted; each of them ran, one at a time
    assert 2 <= report.completed <= 1 + QUEUE, report
    assert report.refused >= N - 1 - QUEUE
    assert all("Queue is full" in o.detail and o.http_status == 503 for o in outcomes if o.status == "refused")
    assert instrumented.peak == 1, f"{instrumented.peak} model jobs ran at once"
    assert instrumented.calls == report.completed
    assert demo.finemask_gate.peak == 1 and demo.finemask_gate.running == 0


def test_run_route_refuses_model_functions_without_running_them(server, instrumented):
    demo, url, seg, images, auth = server
    files = uploaded(url, images, auth)
    instrumented.release.set()
    plan = plan_requests(N, images, models_every=0)
    outcomes = fire_raw(url, plan, "run", model="tiny", uploaded=files, working_size=WORKING_SIZE, auth=auth,
                        time_limit_s=60)
    assert [o.status for o in outcomes] == ["refused"] * N, [o.detail for o in outcomes]
    assert all(o.http_status == 404 and RUN_REFUSED in o.detail for o in outcomes)
    assert instrumented.calls == 0
    # nor by a page event's index (private events too), nor by the other names of the route
    client = RawHttp(url, auth=auth)
    try:
        page_events = [fn._id for fn in demo.fns.values() if fn.concurrency_id == "engine"]
        assert len(page_events) >= 8
        for fn_index in page_events:
            answer = client.post("gradio_api/run/predict", json={"data": [], "fn_index": fn_index})
            assert answer.status_code == 404 and RUN_REFUSED in answer.text
        answer = client.post("gradio_api/api/segment", json={"data": [files[images[0]], "tiny", WORKING_SIZE]})
        assert answer.status_code == 404 and RUN_REFUSED in answer.text
        # a cheap function that never queues still answers through /run
        kind, data, code = raw_call(client, "run", "models", [])
        assert kind == "answered" and "tiny" in data[0]["segmentation"]
    finally:
        client.close()
    assert instrumented.calls == 0


def upload_dir_files(demo) -> set:
    from pathlib import Path

    folder = Path(demo.server_app.uploaded_file_dir) if demo.server_app else None
    return {p for p in folder.rglob("*") if p.is_file()} if folder and folder.is_dir() else set()


def test_upload_requests_are_capped_in_files_and_bytes(server, tmp_path):
    demo, url, _, images, auth = server
    client = RawHttp(url, auth=auth)
    small = [save_png(tmp_path / f"s{i}.png", scene(16, 16, seed=10 + i)) for i in range(LIMITS.max_upload_files + 2)]
    try:
        ok = client.post("gradio_api/upload", files=[("files", (p.name, p.read_bytes())) for p in small[:3]])
        assert ok.status_code == 200 and len(ok.json()) == 3
        before = upload_dir_files(demo)
        too_many = client.post("gradio_api/upload", files=[("files", (p.name, p.read_bytes())) for p in small])
        assert too_many.status_code == 413
        assert f"more than {LIMITS.max_upload_files} files" in too_many.text and "--max-upload-files" in too_many.text
        # too many bytes, declared (Content-Length) and streamed (chunked, no length): refused
        big = b"x" * (LIMITS.max_upload_bytes + 1)
        declared = client.post("gradio_api/upload", files=[("files", ("big.png", big))])
        assert declared.status_code == 413 and "--max-upload-bytes" in declared.text
        boundary = "finemaskboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(body), 16384):
                yield body[i:i + 16384]

        streamed = client.post("gradio_api/upload", content=chunks(),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413 and "--max-upload-bytes" in streamed.text
        assert upload_dir_files(demo) == before, "a refused upload left files behind"
    finally:
        client.close()


def test_finetune_requests_are_capped_in_steps_and_minutes(server, monkeypatch):
    demo, url, _, _, auth = server
    bench = demo.finemask
    asked = []
    monkeypatch.setattr(bench, "finetune", lambda base, steps, minutes, *a, **k: asked.append((steps, minutes))
                        or (_ for _ in ()).throw(RuntimeError("stop here")))
    client = RawHttp(url, auth=auth)
    try:
        for steps, minutes, reason in [(10 ** 9, 0, "at most 50"), (51, 0, "--max-finetune-steps"),
                                       (10, 6, "--max-finetune-minutes"), (10, -1, "time budget")]:
            kind, message, _ = raw_call(client, "call", "finetune", ["tiny", steps, minutes])
            assert kind == "error" and reason in str(message), message
        assert asked == [], "a refused fine-tuning reached the model"
        # within the caps the request goes on; no time budget means the cap's
        cases = [(50, 5, (50, 5.0)), (3, 0, (3, 5.0)), (0, 2, (min(bench.config.finetune.steps, 50), 2.0))]
        for steps, minutes, want in cases:
            kind, message, _ = raw_call(client, "call", "finetune", ["tiny", steps, minutes])
            assert kind == "error" and "RuntimeError" in str(message)
            assert asked[-1] == want
    finally:
        client.close()


def test_unauthenticated_raw_requests_are_refused(server):
    demo, url, _, images, auth = server
    if auth is None:
        pytest.skip("the open server has no login")
    anonymous = httpx.Client(base_url=url, timeout=30)
    try:
        for path in ["gradio_api/call/segment", "gradio_api/run/segment", "gradio_api/queue/join"]:
            assert anonymous.post(path, json={"data": []}).status_code in (401, 403)
        upload = [("files", ("a.png", images[0].read_bytes()))]
        assert anonymous.post("gradio_api/upload", files=upload).status_code in (401, 403)
    finally:
        anonymous.close()
