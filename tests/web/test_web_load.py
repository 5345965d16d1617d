"""50 requests at once: each completes with the right labels or is refused cleanly by the
bounded queue; no 5xx, no other error, no output lost, memory growth bounded.

The server (a tiny segmenter, in this process) holds its first job until the queue has been
seen full, so that every request arrives while the only job slot is taken: the outcome is then
fixed (1 running + QUEUE waiting are served, the other /segment requests refused), not a race.
The requests and the checks are those of ``bench/web_load.py``.
"""
from __future__ import annotations

import os
import threading

import httpx
import pytest

pytest.importorskip("gradio")
from web_testkit import running_app, save_png, scene, tiny_models, web_config

from app.web.server import config_from_args, parse_args
from bench.web_load import (
    OutputCheck,
    RssSampler,
    fire,
    main,
    plan_requests,
    require_loopback,
    summarise,
)

N = 50
QUEUE = 4
WORKING_SIZE = 64
#: Growth of this process's RSS (server and clients together) from the moment the 50 clients
#: have connected to the end of the burst must stay below this; measured 60-70 MiB.
RSS_GROWTH_LIMIT_MIB = 200
#: Longest the first job waits for the queue to fill before it runs anyway.
GATE_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-load")
    seg, _ = tiny_models(folder)
    config = web_config(folder / "store", queue_size=QUEUE, examples=[])
    # four pictures of different sizes, so that an answer for the wrong request is noticed
    images = [save_png(folder / f"scene{i}.png", scene(h, w, seed=i))
              for i, (h, w) in enumerate([(48, 72), (64, 40), (56, 56), (40, 96)])]
    with running_app(config, seg, None) as (demo, url):
        yield demo, url, seg, images


def test_fifty_requests_complete_or_are_refused_and_none_is_lost(server, tmp_path, monkeypatch):
    demo, url, seg, images = server
    bench = demo.finemask
    check = OutputCheck(seg, WORKING_SIZE, images)  # direct Segmenter.predict of each image
    check.model_key = "tiny"
    plan = plan_requests(N, images, models_every=5)
    n_segment = sum(r.endpoint == "segment" for r in plan)
    assert (n_segment, N - n_segment) == (40, 10)

    # Hold the first job until every /segment request that cannot wait has been refused: then
    # the queue is full. At that moment, also call /models the way the page calls events that do
    # not queue (POST /gradio_api/run/...): it must still answer.
    segmenter = bench.registry.load(bench.registry.entry("tiny", "segmentation"))
    real_predict, release = segmenter.predict_batch, threading.Event()
    expect_refused = n_segment - 1 - QUEUE
    refused_segments, while_full = [], []

    def held(*args, **kwargs):
        release.wait(GATE_S)
        return real_predict(*args, **kwargs)

    def on_outcome(outcome):
        if outcome.status == "refused" and outcome.endpoint == "segment":
            refused_segments.append(outcome.index)
            if len(refused_segments) == expect_refused:
                while_full.append(httpx.post(f"{url}gradio_api/run/models", json={"data": []}, timeout=30))
                release.set()

    monkeypatch.setattr(segmenter, "predict_batch", held)
    with RssSampler(os.getpid()) as rss:
        release.set()  # warm-up: one request through the same path, then measure from here
        warm = fire(url, plan[:1], model="tiny", working_size=WORKING_SIZE, check=check, time_limit_s=30)
        assert warm[0].status == "completed", warm[0].detail
        release.clear()
        before = []  # taken once the 50 clients have connected, as the requests go out
        outcomes = fire(url, plan, model="tiny", working_size=WORKING_SIZE, check=check, time_limit_s=60,
                        download_dir=tmp_path, on_start=lambda: before.append(rss.reset()), on_outcome=on_outcome)
        growth = rss.peak_mib - before[0]
    report = summarise(outcomes, 0.0)

    problems = "\n".join(report.failures)
    assert report.requests == N
    assert report.completed + report.refused == N, problems
    assert (report.wrong, report.failed, report.http_5xx) == (0, 0, 0), problems
    assert release.is_set(), "the queue never filled: requests were not concurrent"
    # every refusal is the queue's documented answer (gradio_client sends every call, /models
    # too, through the queue, so a /models arriving while it is full is refused as well)
    assert all("Queue is full" in o.detail for o in outcomes if o.status == "refused")
    # the bound held: at most one running job plus QUEUE waiting ones were served
    served = sum(o.status == "completed" and o.endpoint == "segment" for o in outcomes)
    assert 1 <= served <= QUEUE + 1, served
    # with the queue full, a call that does not queue is still answered (the page's Cancel)
    assert while_full and while_full[0].status_code == 200
    assert "tiny" in while_full[0].json()["data"][0]["segmentation"]
    assert growth < RSS_GROWTH_LIMIT_MIB, f"RSS grew {growth:.0f} MiB"
    print(f"served {served} /segment + {report.completed - served} /models, refused {report.refused}, "
          f"RSS growth {growth:.0f} MiB, latency p95 {report.latency_p95:.2f} s")
    # the server still answers: a refused request succeeds when sent again
    again = fire(url, [plan[refused_segments[0]]], model="tiny", working_size=WORKING_SIZE, check=check,
                 time_limit_s=30)
    assert again[0].status == "completed", again[0].detail


def test_queue_size_option_reaches_the_config():
    assert config_from_args(parse_args([])).queue_size == 20
    assert config_from_args(parse_args(["--queue-size", "3"])).queue_size == 3
    assert config_from_args(parse_args(["--queue-size", "0"])).queue_size == 1  # a queue of 0 would refuse all


@pytest.mark.parametrize("url", ["http://10.1.2.3:7860/", "http://0.0.0.0:7860/", "http://[::ffff:8.8.8.8]:80/",
                                 "http://192.168.0.2/", "ftp://127.0.0.1/", "127.0.0.1:7860"])
def test_load_script_refuses_targets_off_this_machine(url, capsys):
    with pytest.raises(ValueError):
        require_loopback(url)
    assert main(["--url", url, "--requests", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_load_script_accepts_loopback_targets():
    assert require_loopback("http://127.0.0.1:7860") == "http://127.0.0.1:7860/"
    assert require_loopback("http://[::1]:7860/") == "http://[::1]:7860/"
    assert require_loopback("http://localhost:7860/") == "http://localhost:7860/"
