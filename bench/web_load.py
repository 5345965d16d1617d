"""Load test of the web app: N concurrent gradio_client requests against a loopback server.

    python bench/web_load.py                               # starts python -m app.web (camvid), 50 requests
    python bench/web_load.py --requests 50 --queue-size 20 --rounds 2
    python bench/web_load.py --refiner FOLDER               # also /refine requests, with this refiner
    python bench/web_load.py --url http://127.0.0.1:7860/ --pid 1234   # a server already running
    python bench/web_load.py --raw --requests 12 --queue-size 2       # plain HTTP, every route
    python bench/web_load.py --raw --routes call --auth ann:pw        # a server started with --auth

Without ``--url`` the script starts ``python -m app.web`` on 127.0.0.1 and a free port, with a
temporary annotation store, and stops it at the end; a ``--url`` must be a loopback address
(this is a load generator: it refuses to aim at another machine).

Each request is one thread with its own ``gradio_client.Client`` (its own session, like a
separate user). The clients connect first, then all requests fire at once: ``/segment`` on the
sample images (cycled), every ``--models-every``-th one ``/models``, and with ``--refiner`` every
``--refine-every``-th one ``/refine`` (labels from a direct prediction). Each outcome is one of

- completed: answered, and the output checked: a ``/segment`` labels TIFF (and its palette PNG)
  equals a direct ``Segmenter.predict`` of the same image in this process; ``/refine`` labels
  have the image's shape and only classes of the input; ``/models`` lists the model;
- refused: the queue was full, answered at once with HTTP 503 and gradio_client's
  ``QueueError("Queue is full! Please try again.")`` (documented; the client may retry);
- wrong: answered, but the output failed the check (an output lost);
- failed: any other error: HTTP 5xx, an error message from the app, a timeout, a dropped
  connection (an output lost).

With ``--raw`` no gradio_client is used: the images are uploaded once (``/gradio_api/upload``),
then each route of ``--routes`` gets its own burst of plain HTTP POSTs, as curl would send them:
``/gradio_api/run/<name>`` (the answer in the response; the server refuses it for queued
functions: HTTP 404 "join the queue"), ``/gradio_api/call/<name>`` (then its event stream) and
``/gradio_api/queue/join`` (then ``/gradio_api/queue/data``, as the page does). A 503 "Queue is
full" or a /run refused that way counts as refused; completed + refused must equal sent.

The server's memory is sampled every 0.1 s from /proc/<pid>/status (VmRSS summed over the
process and its children; VmHWM of the main process) and its log is scanned for tracebacks.
After each round one more ``/segment`` must complete (the server still serves). The exit code
is 1 when anything failed, was wrong, or the server logged an error; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/web_load.py` from a checkout
    sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "assets" / "samples"
#: Server log lines that mean a bug, not a refused or bad request.
SERVER_ERROR_MARKS = ("Traceback (most recent call last)", "unexpected error in", "ERROR")


# --------------------------------------------------------------------------------------------
# Requests and outcomes


@dataclass(frozen=True)
class Request:
    """One API call of the burst. ``endpoint``: "segment", "refine" or "models"."""

    index: int
    endpoint: str
    image: Path | None = None
    labels: Path | None = None


@dataclass
class Outcome:
    """What became of one request. ``status``: completed, refused, wrong or failed; ``seconds``:
    from submitting (upload included) to the answer (result files downloaded)."""

    index: int
    endpoint: str
    status: str
    seconds: float
    detail: str = ""
    http_status: int | None = None


def plan_requests(n: int, images: list[Path], *, models_every: int = 5, refine_every: int = 0,
                  labels: dict[Path, Path] | None = None) -> list[Request]:
    """``n`` requests: every ``models_every``-th is /models, every ``refine_every``-th of the
    rest /refine (needs ``labels`` per image), the others /segment, images taken in turn."""
    if not images:
        raise ValueError("no images to send")
    plan, k = [], 0
    for i in range(n):
        if models_every and i % models_every == models_every - 1:
            plan.append(Request(i, "models"))
            continue
        image = images[k % len(images)]
        k += 1
        if refine_every and labels and k % refine_every == 0:
            plan.append(Request(i, "refine", image, labels[image]))
        else:
            plan.append(Request(i, "segment", image))
    return plan


def require_loopback(url: str) -> str:
    """``url`` if it is http(s) on a loopback address (every address its host resolves to),
    else ValueError: the load must stay on this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http URL: {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise ValueError(f"refusing to load {parts.hostname!r}: it is not a loopback address ({', '.join(outside)})")
    return url if url.endswith("/") else url + "/"


def classify(exc: BaseException) -> tuple[str, str, int | None]:
    """(status, detail, HTTP status) of a request that raised ``exc``."""
    import httpx
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    if isinstance(exc, QueueError):
        return "refused", str(exc), 503
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return "failed", f"HTTP {code}: {exc.response.text[:200]}", code
    if isinstance(exc, AppError):
        return "failed", f"error from the app: {exc}", None
    if isinstance(exc, TimeoutError):
        return "failed", "no answer before the time limit", None
    return "failed", f"{type(exc).__name__}: {exc}", None


# --------------------------------------------------------------------------------------------
# Checking outputs


class OutputCheck:
    """Checks answers against direct predictions made in this process (see the module doc)."""

    def __init__(self, model: str | Path, working_size: int | None, images: list[Path]):
        from engine.segment import Segmenter

        self.model_key = None  # set by the caller when the server names the model differently
        self.segmenter = Segmenter.from_pretrained(model)
        self.working_size = working_size
        self.expected = {p: self.segmenter.predict(p, working_size).labels for p in images}

    def write_labels(self, folder: Path) -> dict[Path, Path]:
        """The expected labels of each image as a TIFF in ``folder`` (inputs of /refine)."""
        from engine.io import write_labels

        return {p: write_labels(folder / f"{p.stem}_labels.tif", lab) for p, lab in self.expected.items()}

    def __call__(self, request: Request, result: Any) -> str:
        """"" when the answer is right, else what is wrong with it."""
        from engine.io import read_labels

        if request.endpoint == "models":
            names = (result or {}).get("segmentation", []) if isinstance(result, dict) else []
            return "" if self.model_key in names else f"/models does not list {self.model_key!r}: {result!r:.200}"
        tif, png = result[1], result[2]
        if not tif or not Path(tif).is_file():
            return "no labels file in the answer"
        labels = read_labels(tif)
        expected = self.expected[request.image]
        if labels.shape != expected.shape:
            return f"labels are {labels.shape}, the image is {expected.shape}"
        if png and not np.array_equal(read_labels(png), labels):
            return "the palette PNG and the TIFF differ"
        if request.endpoint == "segment":
            same = float((labels == expected).mean())
            return "" if same == 1.0 else f"labels differ from a direct prediction ({100 * same:.3f}% equal)"
        extra = set(np.unique(labels).tolist()) - set(np.unique(expected).tolist())
        return f"refined labels hold classes {sorted(extra)} not in the input" if extra else ""


# --------------------------------------------------------------------------------------------
# Memory of the server process tree


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children, tree, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler:
    """Samples the RSS of a process and its children every ``interval`` s in a thread.

    ``peak_mib``: highest sum of VmRSS over the tree seen since the last ``reset``;
    ``now_mib()``: the sum right now; ``hwm_mib()``: the main process's VmHWM (kernel peak).
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mib(self) -> float:
        return sum(status_kib(p, "VmRSS") for p in process_tree(self.pid)) / 1024

    def hwm_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def reset(self) -> float:
        self.peak_mib = self.now_mib()
        return self.peak_mib

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self.now_mib())

    def __enter__(self) -> Self:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# The burst


def submit(client: Any, request: Request, model: str, working_size: int | None, refiner: str | None = None):
    from gradio_client import handle_file

    if request.endpoint == "models":
        return client.submit(api_name="/models")
    if request.endpoint == "refine":
        return client.submit(image=handle_file(request.image), labels=handle_file(request.labels), mode="fast",
                             refiner=refiner or "", model=model, api_name="/refine")
    return client.submit(image=handle_file(request.image), model=model, working_size=working_size or 0,
                         api_name="/segment")


def fire(url: str, plan: list[Request], *, model: str, working_size: int | None = None, refiner: str | None = None,
         check: Callable[[Request, Any], str] | None = None, time_limit_s: float = 600.0,
         download_dir: Path | None = None, on_start: Callable[[], None] | None = None,
         on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send every request of ``plan`` at once, each from its own client and thread.

    Clients connect first (not timed); then all threads are released together. Every request
    must be answered within ``time_limit_s`` of the release, else it counts as failed. ``check``
    returns "" for a right answer, else the problem (the outcome is then "wrong").
    ``on_start`` is called once every client has connected, just before the requests go out;
    ``on_outcome`` is called from the worker threads as each request ends.
    """
    from gradio_client import Client

    url = require_loopback(url)
    folder = Path(download_dir or tempfile.mkdtemp(prefix="finemask-load-"))
    start: dict[str, float] = {}

    def release() -> None:
        if on_start is not None:
            on_start()
        start["t"] = time.monotonic()

    barrier = threading.Barrier(len(plan), action=release)
    outcomes: list[Outcome | None] = [None] * len(plan)

    def finish(slot: int, outcome: Outcome) -> None:
        outcomes[slot] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    def worker(slot: int, request: Request) -> None:
        client, problem = None, None
        try:
            client = Client(url, verbose=False, download_files=str(folder / str(request.index)),
                            analytics_enabled=False, httpx_kwargs={"timeout": time_limit_s})
        except Exception as exc:  # noqa: BLE001 - counted below, once the others are released
            problem = exc
        try:
            barrier.wait(timeout=max(60.0, time_limit_s))
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()
        if client is None:
            status, detail, code = classify(problem or RuntimeError("no client"))
            finish(slot, Outcome(request.index, request.endpoint, status, 0.0, f"connecting: {detail}", code))
            return
        job = None
        try:
            job = submit(client, request, model, working_size, refiner)
            remaining = start.get("t", t0) + time_limit_s - time.monotonic()
            result = job.result(timeout=max(1.0, remaining))
            seconds = time.monotonic() - t0
            problem_text = check(request, result) if check is not None else ""
            finish(slot, Outcome(request.index, request.endpoint, "wrong" if problem_text else "completed",
                                 seconds, problem_text))
        except BaseException as exc:  # noqa: BLE001 - every failure is counted, none may escape
            status, detail, code = classify(exc)
            if isinstance(exc, TimeoutError) and job is not None:
                job.cancel()
            finish(slot, Outcome(request.index, request.endpoint, status, time.monotonic() - t0, detail, code))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i, r), daemon=True) for i, r in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(60.0, time_limit_s) + time_limit_s + 30)
    for slot, (r, o) in enumerate(zip(plan, outcomes)):
        if o is None:  # a thread that never came back
            finish(slot, Outcome(r.index, r.endpoint, "failed", time_limit_s, "no outcome (thread still running)"))
    if download_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return [o for o in outcomes if o is not None]


# --------------------------------------------------------------------------------------------
# Raw HTTP: plain requests as curl would send them, no gradio_client

#: Routes of the raw mode: POST /gradio_api/run/<name> (answers in the response), POST
#: /gradio_api/call/<name> then GET its event stream, POST /gradio_api/queue/join then GET
#: /gradio_api/queue/data (what the page itself does).
RAW_ROUTES = ("run", "call", "join")
#: Part of the server's answer when /run/<name> is asked for a function that must queue.
RUN_REFUSED = "join the queue"


class RawHttp:
    """One user's plain HTTP client of a FineMask server (``auth``: log in first, like the page)."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout_s: float = 600.0):
        import httpx

        self.url = require_loopback(url)
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)
        self.headers: dict[str, str] = {}
        if auth:
            answer = self.http.post("login", data={"username": auth[0], "password": auth[1]})
            answer.raise_for_status()
            # Gradio marks one of its two session cookies "secure": send both back by hand over http.
            self.headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in answer.cookies.items())

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any):
        return self.http.post(path, headers={**self.headers, **(headers or {})}, **kwargs)

    def upload(self, paths: list[Path]) -> list[dict]:
        """Upload files in one request; their FileData dicts, as inputs of a call."""
        answer = self.post("gradio_api/upload", files=[("files", (p.name, p.read_bytes())) for p in paths])
        answer.raise_for_status()
        return [{"path": server_path, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}}
                for server_path, p in zip(answer.json(), paths)]

    def fn_index(self, api_name: str) -> int:
        """The function index of a named endpoint (from the page's config)."""
        config = self.http.get("config", headers=self.headers)
        config.raise_for_status()
        for dep in config.json()["dependencies"]:
            if dep.get("api_name") == api_name:
                return int(dep["id"])
        raise KeyError(f"no endpoint named {api_name!r}")

    def events(self, path: str, params: dict | None = None):
        """Server-sent events of a GET: (event name, parsed data) pairs."""
        with self.http.stream("GET", path, params=params, headers=self.headers) as answer:
            answer.raise_for_status()
            name = "message"
            for line in answer.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    yield name, json.loads(line[5:].strip() or "null")
                    name = "message"

    def download(self, file_data: dict | None, folder: Path) -> Path | None:
        """A result file (FileData dict with a url) saved in ``folder``."""
        if not file_data or not file_data.get("url"):
            return None
        answer = self.http.get(file_data["url"], headers=self.headers)
        answer.raise_for_status()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(str(file_data.get("orig_name") or file_data["path"])).name
        target.write_bytes(answer.content)
        return target


def raw_call(client: RawHttp, route: str, api_name: str, data: list, fn_index: int | None = None,
             session_hash: str | None = None, on_sent: Callable[[int], None] | None = None) -> tuple[str, Any, int]:
    """Send one call by ``route``; ("answered", output data, 200), ("error", message, HTTP
    status) or ("refused", the server's reason, HTTP status) when it was not accepted.
    ``on_sent`` gets the HTTP status of the POST (accepted or refused) before any result."""
    import uuid

    sent = on_sent or (lambda code: None)
    if route == "run":
        answer = client.post(f"gradio_api/run/{api_name}", json={"data": data})
        sent(answer.status_code)
        if answer.status_code == 200:
            return "answered", answer.json()["data"], 200
        text = answer.text
        refused = answer.status_code == 404 and RUN_REFUSED in text or answer.status_code == 503
        return ("refused" if refused else "error"), text[:300], answer.status_code
    if route == "call":
        answer = client.post(f"gradio_api/call/{api_name}", json={"data": data})
        sent(answer.status_code)
        if answer.status_code != 200:
            return ("refused" if answer.status_code == 503 else "error"), answer.text[:300], answer.status_code
        for name, payload in client.events(f"gradio_api/call/{api_name}/{answer.json()['event_id']}"):
            if name == "complete":
                return "answered", payload, 200
            if name == "error":
                return "error", str(payload)[:300], 200
        return "error", "the event stream ended without a result", 200
    if route == "join":
        session_hash = session_hash or uuid.uuid4().hex[:12]
        answer = client.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash":
                                                            session_hash, "event_data": None, "trigger_id": None})
        sent(answer.status_code)
        if answer.status_code != 200:
            return ("refused" if answer.status_code == 503 else "error"), answer.text[:300], answer.status_code
        event_id = answer.json()["event_id"]
        for _, msg in client.events("gradio_api/queue/data", {"session_hash": session_hash}):
            if isinstance(msg, dict) and msg.get("msg") == "process_completed" and msg.get("event_id") == event_id:
                output = msg.get("output") or {}
                if msg.get("success"):
                    return "answered", output.get("data"), 200
                return "error", str(output.get("error") or output)[:300], 200
        return "error", "the event stream ended without a result", 200
    raise ValueError(f"unknown route {route!r} (one of {', '.join(RAW_ROUTES)})")


def fire_raw(url: str, plan: list[Request], route: str, *, model: str, uploaded: dict[Path, dict],
             working_size: int | None = None, auth: tuple[str, str] | None = None,
             check: Callable[[Request, Any], str] | None = None, time_limit_s: float = 600.0,
             download_dir: Path | None = None, on_start: Callable[[], None] | None = None,
             on_sent: Callable[[int], None] | None = None) -> list[Outcome]:
    """Send every request of ``plan`` at once by ``route`` (see :data:`RAW_ROUTES`), each from its
    own client (logged in with ``auth``) and thread; images were uploaded before (``uploaded``:
    their FileData). Outcomes as in :func:`fire`: a /run refused with "join the queue" or any
    503 "Queue is full" counts as refused. ``on_start``: called once all clients are ready, as
    the requests go out; ``on_sent``: called with each POST's HTTP status (see :func:`raw_call`)."""
    url = require_loopback(url)
    folder = Path(download_dir or tempfile.mkdtemp(prefix="finemask-raw-"))
    probe = RawHttp(url, auth=auth)
    index = {name: probe.fn_index(name) for name in {r.endpoint for r in plan}} if route == "join" else {}
    probe.close()
    clients: list[RawHttp | None] = [None] * len(plan)
    outcomes: list[Outcome | None] = [None] * len(plan)
    barrier = threading.Barrier(len(plan), action=on_start)

    def worker(slot: int, request: Request) -> None:
        try:
            clients[slot] = client = RawHttp(url, auth=auth, timeout_s=time_limit_s)
        except Exception as exc:  # noqa: BLE001 - counted as failed once the others go
            client, problem = None, exc
        try:
            barrier.wait(timeout=max(60.0, time_limit_s))
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()
        if client is None:
            outcomes[slot] = Outcome(request.index, request.endpoint, "failed", 0.0, f"connecting: {problem}")
            return
        data = [] if request.endpoint == "models" else [uploaded[request.image], model, working_size or 0]
        try:
            kind, payload, code = raw_call(client, route, request.endpoint, data, index.get(request.endpoint),
                                           on_sent=on_sent)
            seconds = time.monotonic() - t0
            if kind == "refused":
                outcome = Outcome(request.index, request.endpoint, "refused", seconds, str(payload), code)
            elif kind == "error":
                outcome = Outcome(request.index, request.endpoint, "failed", seconds, str(payload), code)
            else:
                result: Any = payload[0] if request.endpoint == "models" else payload
                if request.endpoint != "models":
                    where = folder / str(request.index)
                    result = (None, client.download(payload[1], where), client.download(payload[2], where),
                              None, payload[4])
                problem = check(request, result) if check is not None else ""
                outcome = Outcome(request.index, request.endpoint, "wrong" if problem else "completed", seconds,
                                  problem, code)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none may escape
            status, detail, code = classify(exc)
            outcome = Outcome(request.index, request.endpoint, status, time.monotonic() - t0, detail, code)
        finally:
            client.close()
        outcomes[slot] = outcome

    threads = [threading.Thread(target=worker, args=(i, r), daemon=True) for i, r in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(60.0, time_limit_s) + time_limit_s + 30)
    if download_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return [o or Outcome(r.index, r.endpoint, "failed", time_limit_s, "no outcome (thread still running)")
            for r, o in zip(plan, outcomes)]


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class RoundReport:
    """Figures of one burst. ``by_endpoint`` / ``completed_by`` / ``refused_by``: request counts
    per endpoint; latency (seconds, upload and download included) of the completed model jobs
    (/segment, /refine); memory in MiB of the server's process tree."""

    requests: int
    by_endpoint: dict[str, int]
    completed: int
    refused: int
    wrong: int
    failed: int
    http_5xx: int
    completed_by: dict[str, int]
    refused_by: dict[str, int]
    latency_p50: float | None
    latency_p95: float | None
    latency_max: float | None
    models_max_s: float | None
    refused_max_s: float | None
    wall_s: float
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None
    served_after: bool | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.wrong + self.failed

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_before_mib is None or self.rss_peak_mib is None:
            return None
        return self.rss_peak_mib - self.rss_before_mib


def _counts(outcomes: list[Outcome], status: str | None = None) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for o in outcomes:
        if status is None or o.status == status:
            counts[o.endpoint] += 1
    return dict(sorted(counts.items()))


def summarise(outcomes: list[Outcome], wall_s: float) -> RoundReport:
    jobs = sorted(o.seconds for o in outcomes if o.status == "completed" and o.endpoint != "models")
    models = [o.seconds for o in outcomes if o.status == "completed" and o.endpoint == "models"]
    refused = [o.seconds for o in outcomes if o.status == "refused"]
    count = {s: sum(o.status == s for o in outcomes) for s in ("completed", "refused", "wrong", "failed")}
    http_5xx = sum(1 for o in outcomes if o.status == "failed" and o.http_status is not None and o.http_status >= 500)
    failures = [f"#{o.index} /{o.endpoint} {o.status}: {o.detail}" for o in outcomes if o.status in ("wrong", "failed")]
    return RoundReport(
        requests=len(outcomes), by_endpoint=_counts(outcomes), completed_by=_counts(outcomes, "completed"),
        refused_by=_counts(outcomes, "refused"), http_5xx=http_5xx, failures=failures, wall_s=wall_s,
        latency_p50=float(np.percentile(jobs, 50)) if jobs else None,
        latency_p95=float(np.percentile(jobs, 95)) if jobs else None,
        latency_max=max(jobs) if jobs else None, models_max_s=max(models) if models else None,
        refused_max_s=max(refused) if refused else None, **count)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _split(total: int, by: dict[str, int]) -> str:
    return f"{total} ({', '.join(f'{k} {v}' for k, v in by.items())})" if by else str(total)


def table(rounds: list[RoundReport], settings: dict[str, Any], server_errors: list[str], hwm_mib: float | None,
          names: list[str] | None = None) -> str:
    """A Markdown table: one column per round (``names``: the columns' titles, default "round N")."""
    rows = [
        ("requests, all at once", [_split(r.requests, r.by_endpoint) for r in rounds]),
        ("completed, output checked", [_split(r.completed, r.completed_by) for r in rounds]),
        ("refused at once (503 'Queue is full'; /run: 404 'join the queue')",
         [_split(r.refused, r.refused_by) for r in rounds]),
        ("wrong output", [str(r.wrong) for r in rounds]),
        ("failed: 5xx / other", [f"{r.http_5xx} / {r.failed - r.http_5xx}" for r in rounds]),
        ("outputs lost (wrong + failed)", [str(r.lost) for r in rounds]),
        ("model jobs' latency p50 / p95 / max",
         [f"{_fmt(r.latency_p50, ' s')} / {_fmt(r.latency_p95, ' s')} / {_fmt(r.latency_max, ' s')}" for r in rounds]),
        ("slowest /models answer", [_fmt(r.models_max_s, " s", 2) for r in rounds]),
        ("slowest refusal", [_fmt(r.refused_max_s, " s", 2) for r in rounds]),
        ("burst wall time", [_fmt(r.wall_s, " s") for r in rounds]),
        ("server RSS before / peak / after", [f"{_fmt(r.rss_before_mib)} / {_fmt(r.rss_peak_mib)} / "
                                              f"{_fmt(r.rss_after_mib)} MiB" for r in rounds]),
        ("RSS growth (peak - before)", [_fmt(r.rss_growth_mib, " MiB") for r in rounds]),
        ("server answers a /segment after the burst", ["yes" if r.served_after else "NO" for r in rounds]),
    ]
    names = names or [f"round {i + 1}" for i in range(len(rounds))]
    head = "| | " + " | ".join(names) + " |"
    lines = ["Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "", head,
             "|---|" + "---|" * len(rounds)]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    lines += ["", f"Server VmHWM (kernel peak RSS of the main process): {_fmt(hwm_mib, ' MiB')}",
              f"Server log lines that signal an error: {len(server_errors)}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The server


class ServerProcess:
    """``python -m app.web`` on 127.0.0.1 and a free port, its output collected in a thread."""

    def __init__(self, args: list[str], *, threads: int | None, start_timeout_s: float = 300.0):
        from app.web.browser import free_port

        self.port = free_port()
        cmd = [sys.executable, "-m", "app.web", "--host", "127.0.0.1", "--port", str(self.port), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            cmd += ["--threads", str(threads)]
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))
        self.url = f"http://127.0.0.1:{self.port}/"

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if "running on" in line:
                self._ready.set()
        self._ready.set()

    def errors(self) -> list[str]:
        return [line.rstrip() for line in self.lines if any(mark in line for mark in SERVER_ERROR_MARKS)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a server already running on this machine (loopback only); default: start one")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its memory")
    p.add_argument("--requests", type=int, default=50, help="requests per burst, all at once (50)")
    p.add_argument("--rounds", type=int, default=1, help="bursts, one after the other (1)")
    p.add_argument("--model", default="camvid", help="segmentation model (camvid)")
    p.add_argument("--working-size", type=int, default=None, help="working size (default: the model's)")
    p.add_argument("--refiner", default=None, help="also send /refine requests with this refinement model")
    p.add_argument("--models-every", type=int, default=5, help="every n-th request is /models (5; 0: none)")
    p.add_argument("--refine-every", type=int, default=4, help="with --refiner: every n-th image request is /refine")
    p.add_argument("--images", type=Path, nargs="+", default=None, help="images to send (default: assets/samples)")
    p.add_argument("--queue-size", type=int, default=20, help="server's --queue-size when started here (20)")
    p.add_argument("--concurrency", type=int, default=1, help="server's --concurrency when started here (1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server and of the check")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds a burst may take (900)")
    p.add_argument("--no-check", action="store_true", help="do not compare answers with direct predictions")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--raw", action="store_true",
                   help="plain HTTP requests (no gradio_client), one burst per route of --routes; images uploaded "
                        "once before the bursts; /segment and /models only")
    p.add_argument("--routes", nargs="+", choices=RAW_ROUTES, default=list(RAW_ROUTES),
                   help="with --raw: POST /gradio_api/run/<name>, /gradio_api/call/<name>, /gradio_api/queue/join")
    p.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                   help="log in with this (a server started here gets it as its --auth)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = None
    try:
        if args.url:
            require_loopback(args.url)
        if args.auth:
            user, sep, password = args.auth.partition(":")
            if not (user and sep and password):
                raise ValueError("--auth must look like user:password")
            auth = (user, password)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = [p.resolve() for p in (args.images or sorted(SAMPLES.glob("*.jpg")))]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="finemask-load-"))
    server = None
    try:
        check = None
        labels = None
        refiner = args.refiner if not args.raw else None  # the raw mode sends /segment and /models
        if not args.no_check or refiner:
            print(f"direct predictions of {len(images)} images for the check…", flush=True)
            check = OutputCheck(args.model, args.working_size, images)
            labels = check.write_labels(work) if refiner else None
        if args.url:
            url, pid = require_loopback(args.url), args.pid
        else:
            extra = ["--model", str(args.model), "--store", str(work / "store"), "--queue-size", str(args.queue_size),
                     "--concurrency", str(args.concurrency)]
            if refiner:
                extra += ["--refiner", str(refiner)]
            if auth:
                extra += ["--auth", ":".join(auth)]
            print("starting the server…", flush=True)
            server = ServerProcess(extra, threads=args.threads)
            url, pid = server.url, server.proc.pid
            print(" ".join(server.cmd[1:]), flush=True)
        from gradio_client import Client

        probe = Client(url, verbose=False, analytics_enabled=False, download_files=str(work / "probe"), auth=auth)
        offered = probe.predict(api_name="/models")  # a folder given here has a key on the server
        model_key = offered["default_model"] if Path(str(args.model)).is_dir() else args.model
        refiner_key = offered["default_refiner"] if refiner and Path(refiner).is_dir() else refiner
        if check is not None:
            check.model_key = model_key
        if args.no_check:
            check = None
        plan = plan_requests(args.requests, images, models_every=args.models_every,
                             refine_every=args.refine_every if refiner else 0, labels=labels)
        warm = Request(-1, "segment", images[0])
        raw = RawHttp(url, auth=auth, timeout_s=args.time_limit) if args.raw else None
        uploaded = dict(zip(images, raw.upload(images))) if raw else {}

        def one_more() -> bool:
            """One /segment after a burst (by /call in the raw mode): the server still serves."""
            if raw is not None:
                kind, payload, _ = raw_call(raw, "call", "segment", [uploaded[images[0]], model_key,
                                                                      args.working_size or 0])
                if kind != "answered":
                    raise RuntimeError(f"{kind}: {payload}")
                result = (None, raw.download(payload[1], work / "after"), raw.download(payload[2], work / "after"),
                          None, payload[4])
            else:
                result = submit(probe, warm, model_key, args.working_size).result(timeout=args.time_limit)
            return check is None or not check(warm, result)

        bursts = [(f"/{route} round {i + 1}" if args.rounds > 1 else f"/{route}", route)
                  for route in args.routes for i in range(args.rounds)] if raw else \
            [(f"round {i + 1}", None) for i in range(args.rounds)]
        rounds: list[RoundReport] = []
        with RssSampler(pid) if pid else contextlib.nullcontext() as sampler:
            one_more()  # models loaded, warm
            for i, (name, route) in enumerate(bursts):
                before = sampler.reset() if sampler else None
                print(f"{name}: {len(plan)} requests at once…", flush=True)
                t0 = time.monotonic()
                if route is None:
                    outcomes = fire(url, plan, model=model_key, working_size=args.working_size, refiner=refiner_key,
                                    check=check, time_limit_s=args.time_limit, download_dir=work / f"round{i}")
                else:
                    outcomes = fire_raw(url, plan, route, model=model_key, uploaded=uploaded, auth=auth,
                                        working_size=args.working_size, check=check, time_limit_s=args.time_limit,
                                        download_dir=work / f"round{i}")
                report = summarise(outcomes, time.monotonic() - t0)
                if sampler:
                    report.rss_before_mib, report.rss_peak_mib = before, sampler.peak_mib
                try:
                    report.served_after = one_more()
                except Exception as exc:  # noqa: BLE001
                    report.served_after = False
                    report.failures.append(f"after the burst: {classify(exc)[1]}")
                if sampler:
                    report.rss_after_mib = sampler.now_mib()
                rounds.append(report)
                shutil.rmtree(work / f"round{i}", ignore_errors=True)
            hwm = sampler.hwm_mib() if sampler else None
        probe.close()
        if raw is not None:
            raw.close()
        errors = server.errors() if server else []
        settings = {"url": url, "model": model_key, "requests": args.requests, "rounds": args.rounds,
                    "mode": "raw HTTP (" + ", ".join(args.routes) + ")" if args.raw else "gradio_client",
                    "login": "yes" if auth else "no",
                    "queue size": args.queue_size if server else "(server's)",
                    "server concurrency": args.concurrency if server else "(server's)",
                    "working size": args.working_size or "model's", "images": ", ".join(p.name for p in images)}
        print(table(rounds, settings, errors, hwm, [name for name, _ in bursts]))
        for r in rounds:
            for line in r.failures[:20]:
                print("  " + line)
        for line in errors[:20]:
            print("  server: " + line)
        if args.json:
            data = {"settings": settings, "server_vmhwm_mib": hwm, "server_errors": errors,
                    "rounds": [dict(asdict(r), name=name, lost=r.lost, rss_growth_mib=r.rss_growth_mib)
                               for r, (name, _) in zip(rounds, bursts)]}
            args.json.write_text(json.dumps(data, indent=1, default=str))
        bad = any(r.lost or r.http_5xx or not r.served_after or r.completed + r.refused != r.requests
                  for r in rounds) or bool(errors)
        return 1 if bad else 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
