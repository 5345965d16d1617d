"""``python -m app.web``: command line, start-up message, login."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
from web_testkit import tiny_models

from app.web.browser import free_port
from app.web.server import config_from_args, main, parse_args
from engine.errors import FineMaskError

ROOT = Path(__file__).resolve().parents[2]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_defaults_listen_on_loopback_only(monkeypatch):
    monkeypatch.delenv("FINEMASK_WEB_AUTH", raising=False)
    cfg = config_from_args(parse_args([]))
    assert (cfg.host, cfg.port, cfg.share, cfg.auth, cfg.concurrency) == ("127.0.0.1", 7860, False, None, 1)
    assert cfg.model == "camvid" and cfg.refiner == "refine-light"
    assert cfg.store.parts[-2:] == ("finemask", "store")


def test_auth_must_be_user_colon_password(monkeypatch):
    assert config_from_args(parse_args(["--auth", "ann:s3:cret"])).auth == ("ann", "s3:cret")
    monkeypatch.setenv("FINEMASK_WEB_AUTH", "bob:pw")
    assert config_from_args(parse_args([])).auth == ("bob", "pw")
    for bad in ("ann", "ann:", ":secret"):
        with pytest.raises(FineMaskError, match="user:password"):
            config_from_args(parse_args(["--auth", bad]))


def test_a_missing_default_model_is_reported_not_raised(tmp_path, capsys):
    assert main(["--model", "no-such-model", "--store", str(tmp_path / "store")]) == 2
    assert "no such model" in capsys.readouterr().err


def test_python_m_app_web_prints_its_address_and_asks_for_the_login(tmp_path):
    seg, ref = tiny_models(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "app.web", "--port", str(port), "--store", str(tmp_path / "store"),
           "--model", str(seg), "--refiner", str(ref), "--auth", "ann:secret"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "running on" in line:
                break
        assert any(f"FineMask web app running on http://127.0.0.1:{port}/" in line for line in lines), lines
        assert status_of(f"http://127.0.0.1:{port}/config") == 401  # nothing without the login
        login = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=b"username=ann&password=secret")
        with urllib.request.urlopen(login, timeout=10) as response:
            assert response.status == 200
        wrong = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=b"username=ann&password=guess")
        assert status_of_request(wrong) == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def status_of_request(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
