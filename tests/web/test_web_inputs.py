"""Bad and unusual inputs get a clear message naming the file, and the server stays up."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from web_testkit import running_app, save_png, scene, tiny_models, web_config

from engine.errors import FineMaskError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-inputs")
    seg, _ = tiny_models(folder)
    with running_app(web_config(folder / "store"), seg, None) as (demo, url):  # no refiner installed
        yield demo, url


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but which holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def segment(client: Client, path: Path) -> dict:
    return client.predict(image=handle_file(path), model="", working_size=64, api_name="/segment")[4]


@pytest.mark.parametrize("case", ["corrupt", "text", "one_pixel", "huge_header"])
def test_bad_file_gives_a_message_naming_it(client, tmp_path, case):
    if case == "corrupt":
        good = save_png(tmp_path / "whole.png", scene(96, 128))
        path = tmp_path / "corrupt.png"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated in the pixel data
        expected = r"corrupt|truncated"
    elif case == "text":
        path = tmp_path / "notes.png"
        path.write_text("these are my notes, not a picture\n")
        expected = r"not a readable image"
    elif case == "one_pixel":
        path = save_png(tmp_path / "dot.png", np.zeros((1, 1, 3), np.uint8))
        expected = r"only 1x1 pixels.*at least 8x8"
    else:
        path = png_header_only(tmp_path / "huge.png", 20000, 20000)
        expected = r"400,000,000 pixels, more than the limit"
    with pytest.raises(AppError, match=rf"{path.name}: .*({expected})"):
        segment(client, path)


def test_rgba_and_16_bit_tiff_work_with_a_note(client, tmp_path):
    rgba = np.dstack([scene(), np.full((48, 72), 128, np.uint8)])
    info = segment(client, save_png(tmp_path / "rgba.png", rgba))
    assert info["height"] == 48 and any("alpha" in n for n in info["notes"])

    deep = (scene().astype(np.uint16) * 16)  # a 12-bit range stored in 16 bits, as cameras do
    tifffile.imwrite(tmp_path / "deep.tif", deep)
    info = segment(client, tmp_path / "deep.tif")
    assert info["width"] == 72 and any("16-bit" in n for n in info["notes"])


def test_server_stays_up_after_bad_inputs(client, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for _ in range(3):
        with pytest.raises(AppError, match="bad.png"):
            segment(client, bad)
    info = segment(client, save_png(tmp_path / "fine.png", scene()))
    assert info["classes"]


def test_refine_without_a_refiner_explains_it(client, tmp_path):
    image = save_png(tmp_path / "scene.png", scene())
    _, tif, _, _, _ = client.predict(image=handle_file(image), model="", working_size=64, api_name="/segment")
    with pytest.raises(AppError, match="no refinement model available"):
        client.predict(image=handle_file(image), labels=handle_file(tif), mode="fast", api_name="/refine")


def test_labels_of_the_wrong_size_are_refused(client, tmp_path):
    image = save_png(tmp_path / "scene.png", scene())
    wrong = tmp_path / "wrong.tif"
    tifffile.imwrite(wrong, np.zeros((10, 10), np.uint8))
    with pytest.raises(AppError, match=r"wrong.tif.*does not match the image"):
        client.predict(image=handle_file(image), labels=handle_file(wrong), api_name="/save")


def test_server_refuses_uploads_over_the_size_limit(server):
    import httpx

    _, url = server
    payload = b"\0" * (1_100_000)  # the test server's limit is 1 MB
    response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", payload, "image/png")}, timeout=30)
    assert response.status_code == 413


def test_workbench_keeps_the_bit_depth_and_checks_the_pixel_limit(server, tmp_path):
    demo, _ = server
    bench = demo.finemask
    tifffile.imwrite(tmp_path / "deep.tif", scene().astype(np.uint16) * 256)
    work = bench.open_image(tmp_path / "deep.tif")
    assert work.image.dtype == np.uint16 and work.image.shape == (48, 72, 3)
    work = bench.open_image(save_png(tmp_path / "flat.png", scene()))
    assert work.image.dtype == np.uint8
    np.testing.assert_array_equal(work.image, scene())
    Image.fromarray(scene(100, 100)).save(tmp_path / "big.png")
    limit = bench.config.max_pixels
    bench.config.max_pixels = 99 * 100
    try:
        with pytest.raises(FineMaskError, match=r"big.png: image has 10,000 pixels, more than the limit of 9,900"):
            bench.open_image(tmp_path / "big.png")
    finally:
        bench.config.max_pixels = limit
