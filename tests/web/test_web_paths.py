"""Requests for files outside the app's folders are refused (403/404, never the bytes).

test_web_api.py checks plain absolute paths on ``/gradio_api/file=``; this module adds the other
file routes, the model weights, ``..`` traversal (plain, URL-encoded, double-encoded), symlinks
placed in the examples folder, and the annotation store's folder and files.
"""
from __future__ import annotations

import http.client
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")
from web_testkit import running_app, save_png, scene, tiny_models, web_config

from app.web.server import served_examples

ROOT = Path(__file__).resolve().parents[2]
#: The routes Gradio serves files on: the current one, the deprecated ``/file/`` form, and the
#: pre-4 ``/file=`` at the root.
ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server whose examples folder holds two images and symlinks leading out of it."""
    folder = tmp_path_factory.mktemp("web-paths")
    seg, _ = tiny_models(folder)
    private = folder / "private"
    private.mkdir()
    secret_png = save_png(private / "holiday.png", scene(seed=9))
    (private / "secret.txt").write_text("PRIVATE-NOTES-1234\n")
    examples = folder / "examples"
    examples.mkdir()
    good = [save_png(examples / "a.png", scene()), save_png(examples / "b.png", scene(64, 40, seed=1))]
    (examples / "evil.png").symlink_to(secret_png)  # looks like an example image
    (examples / "passwd.png").symlink_to("/etc/passwd")
    (examples / "private").symlink_to(private, target_is_directory=True)
    # listed as examples the way bundled_examples() lists a folder (is_file() follows links)
    listed = [*good, examples / "evil.png", examples / "passwd.png"]
    config = web_config(folder / "store", examples=listed)
    with running_app(config, seg, None) as (demo, url):
        store = demo.finemask.store
        labels = np.zeros((48, 72), np.uint8)
        labels[:, 36:] = 1
        store.add(scene(seed=3), labels, "corrected")
        yield {"demo": demo, "port": urllib.parse.urlsplit(url).port, "url": url, "examples": examples,
               "good": good, "private": private, "secret_png": secret_png, "seg": seg, "store": store.root}


def fetch(port: int, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send ``target`` exactly as written (no client-side normalisation of ``..`` or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_refused(port: int, target: str, secret: bytes) -> None:
    status, body = fetch(port, target)
    assert status in (403, 404), f"{target} -> {status}"
    assert secret not in body, f"{target} returned the file's bytes"


def head_of(path: Path, n: int = 48) -> bytes:
    data = path.read_bytes()
    middle = len(data) // 2
    return data[middle: middle + n] if len(data) > 2 * n else data


def outside_files(site) -> list[Path]:
    store = site["store"]
    files = [Path("/etc/passwd"), site["seg"] / "model.safetensors", site["seg"] / "card.json",
             ROOT / "assets" / "models" / "camvid" / "model.safetensors", ROOT / "README.md", ROOT / "pyproject.toml",
             ROOT / "app" / "web" / "server.py", site["private"] / "secret.txt", site["secret_png"],
             store / "manifest.json", *sorted((store / "images").iterdir()), *sorted((store / "labels").iterdir())]
    return [f for f in files if f.is_file()]


def test_absolute_paths_outside_are_refused_on_every_file_route(site):
    files = outside_files(site)
    assert len(files) >= 11  # store image and labels included
    for path in files:
        secret = head_of(path)
        for route in ROUTES:
            assert_refused(site["port"], route + urllib.parse.quote(str(path)), secret)
    status, body = fetch(site["port"], "/gradio_api/file=/etc/passwd", method="HEAD")
    assert status == 403 and not body


def test_traversal_out_of_the_examples_folder_is_refused(site):
    examples = str(site["examples"])
    up = "/".join([".."] * (len(site["examples"].parts) + 2))
    passwd = head_of(Path("/etc/passwd"))
    note = b"PRIVATE-NOTES-1234"
    cases = [
        (f"{examples}/../private/secret.txt", note),
        (f"{examples}/{up}/etc/passwd", passwd),
        (f"{up}/etc/passwd", passwd),  # relative to the server's working folder
        (f"{examples}/%2e%2e/private/secret.txt", note),
        (f"{examples}/%2E%2E%2Fprivate%2Fsecret.txt", note),
        (f"{examples}/{up.replace('..', '%2e%2e')}/etc/passwd", passwd),
        (f"{examples}/%252e%252e/private/secret.txt", note),  # double encoding
        (f"{examples}/{up.replace('..', '%252e%252e')}/etc/passwd", passwd),
        (f"{examples}/..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd", passwd),
        (f"{examples}/a.png%00/../../private/secret.txt", note),  # NUL byte
        (f"{examples}/./../private/./secret.txt", note),
    ]
    for path, secret in cases:
        for route in ROUTES:
            assert_refused(site["port"], route + path, secret)


def test_symlinks_in_the_examples_folder_do_not_lead_out(site, tmp_path):
    examples, private = site["examples"], site["private"]
    holiday = head_of(site["secret_png"])
    for link, secret in [(examples / "evil.png", holiday), (examples / "passwd.png", head_of(Path("/etc/passwd"))),
                         (examples / "private" / "secret.txt", b"PRIVATE-NOTES-1234"),
                         (examples / "private" / "holiday.png", holiday)]:
        for route in ROUTES:
            assert_refused(site["port"], route + str(link), secret)
    # a symlinked example is neither offered on the page (Gradio would copy its target into its
    # cache) nor does its target's folder become servable
    assert served_examples([examples / "evil.png", examples / "passwd.png", examples / "a.png"]) == [examples / "a.png"]
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert served_examples([tmp_path / "dangling.png", tmp_path / "loop.png", tmp_path / "missing.png"]) == []
    status, page_config = fetch(site["port"], "/config")
    assert status == 200 and b"a.png" in page_config
    assert b"evil.png" not in page_config and b"passwd.png" not in page_config
    assert_refused(site["port"], f"/gradio_api/file={private / 'holiday.png'}", holiday)
    assert str(private) not in site["demo"].allowed_paths


def test_the_store_folder_is_refused_and_the_examples_are_still_served(site):
    store = site["store"]
    for folder in (store, store / "images", store / "labels", store / "models", site["examples"], site["private"]):
        status, body = fetch(site["port"], f"/gradio_api/file={folder}")
        assert status in (403, 404), folder
        assert b"manifest" not in body and b"secret" not in body
    for image in site["good"]:
        status, body = fetch(site["port"], f"/gradio_api/file={image}")
        assert status == 200 and body == image.read_bytes()
    # the same file through a harmless ``.`` segment is the same allowed file
    status, body = fetch(site["port"], f"/gradio_api/file={site['examples']}/./a.png")
    assert status == 200 and body == site["good"][0].read_bytes()
