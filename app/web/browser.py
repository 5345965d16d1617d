"""Drive the web page in headless Chromium with Playwright: the browser tests and README screenshots.

``python -m app.web.browser docs/images`` starts the app with the shipped models on a free
loopback port, picks the first bundled example (which also picks the model it is for), segments
it, paints one stroke, and writes ``web_result.png`` and ``web_correct.png`` there (the browser
test ``tests/web/test_web_screenshots.py`` does the same). It uses Debian's Chromium
(``/usr/bin/chromium``); Playwright's own browser download is never needed.
"""
from __future__ import annotations

import argparse
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1000}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def chromium_page(executable: str = CHROMIUM) -> Iterator[Any]:
    """A fresh page in headless Chromium (closed on exit)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def wait_status(page: Any, text: str, timeout_s: float) -> None:
    """Wait until the status panel contains ``text``."""
    page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text,
                           timeout=timeout_s * 1000, polling=100)


def wait_idle(page: Any, timeout_s: float) -> None:
    """Wait until no output shows a progress indicator (the page has finished updating)."""
    busy = ".pending, .meta-text, .meta-text-center, .eta-bar, .progress-level"
    page.wait_for_function(f"() => !document.querySelector('{busy}')", timeout=timeout_s * 1000, polling=100)
    page.wait_for_timeout(500)  # fade-out transitions of the progress overlays


def wait_image(page: Any, selector: str, timeout_s: float) -> None:
    """Wait until the first ``<img>`` matching ``selector`` is visible and its picture has loaded."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s);"
        " return !!i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; }",
        arg=selector, timeout=timeout_s * 1000, polling=100)
    page.wait_for_timeout(300)  # the tab's fade-in


def close_toasts(page: Any) -> None:
    for button in page.locator(".toast-close").all():
        try:
            button.click(timeout=1000)
        except Exception:  # noqa: BLE001 - a toast that closed by itself meanwhile
            continue


def wait_toast(page: Any, text: str, timeout_s: float) -> str:
    """Wait for a message toast containing ``text``; return the toast's text."""
    toast = page.locator(".toast-body", has_text=text).first
    toast.wait_for(timeout=timeout_s * 1000)
    return toast.inner_text()


def upload(page: Any, path: Path) -> None:
    """Put ``path`` into the image upload (clearing a file shown there first)."""
    clear = page.locator("#image-file button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#image-file input[type=file]").wait_for(state="attached", timeout=30_000)
    page.set_input_files("#image-file input[type=file]", str(path))


def paint_stroke(page: Any, length: float = 0.3, steps: int = 12) -> None:
    """One stroke of the current brush (at first the first swatch) from the editor's centre, in
    ``steps`` mouse moves.

    The editor centres the image in its canvas, so a stroke from the centre spanning ``length``
    of the canvas's shorter side stays on the image (a stroke starting outside it is ignored).
    """
    page.locator("#editor button[aria-label='Brush']").first.click()
    canvas = page.locator("#editor canvas").first
    canvas.wait_for(timeout=30_000)
    box = canvas.bounding_box()
    span = length * min(box["width"], box["height"])
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(x0 + span * i / steps, y0 + span * i / (3 * steps))
    page.mouse.up()


def walkthrough(page: Any, url: str, image: Path, *, refine: bool = False, shots: Path | None = None,
                timeout_s: float = 60.0) -> dict[str, float]:
    """Upload ``image``, Segment, optionally Refine, paint one stroke, Save. Returns seconds per step.

    With ``shots`` a folder, writes ``web_result.png`` (after segmenting or refining) and
    ``web_correct.png`` (the editor with the stroke, before saving) there.
    """
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 2)
        t = now

    page.goto(url)
    page.wait_for_selector("#segment-btn", timeout=timeout_s * 1000)
    lap("load")
    upload(page, image)
    wait_status(page, "Image loaded", timeout_s)
    lap("upload")
    page.click("#segment-btn")
    wait_status(page, "Segmented.", timeout_s)
    page.wait_for_selector("#overlay img", timeout=timeout_s * 1000)
    lap("segment")
    if refine:
        page.click("#refine-btn")
        wait_status(page, "Refined", timeout_s * 5)
        lap("refine")
    if shots is not None:
        wait_idle(page, timeout_s)
        close_toasts(page)
        page.screenshot(path=str(shots / "web_result.png"), full_page=True)
    page.get_by_role("tab", name="Correct").click()
    page.wait_for_selector("#editor canvas", timeout=timeout_s * 1000)
    page.wait_for_timeout(500)  # the editor draws its background after the canvas appears
    for attempt in range(3):
        # A stroke made before the editor has drawn its image is ignored; Save then stores the
        # labels unchanged, and the stroke is tried again.
        paint_stroke(page)
        lap("stroke")
        if shots is not None and attempt == 0:
            close_toasts(page)
            page.screenshot(path=str(shots / "web_correct.png"), full_page=True)
        before = page.inner_text("#status")
        page.click("#save-btn")
        page.wait_for_function(
            "old => { const t = document.querySelector('#status')?.innerText || '';"
            " return t !== old && t.includes('saved as pair'); }",
            arg=before, timeout=timeout_s * 1000, polling=100)
        lap("save")
        if "pixels corrected" in page.inner_text("#status"):
            break
        page.wait_for_timeout(1000)
    return times


def readme_screenshots(page: Any, url: str, out: Path, *, timeout_s: float = 600.0) -> dict[str, str]:
    """The README's screenshots of a page at ``url``: pick the first example, Segment, write
    ``web_result.png``; paint one stroke in the Correct tab, write ``web_correct.png``. Both are
    written to a temporary name first and renamed into ``out``. Returns what the page showed
    (model, status, legend) for the caller to check."""
    import os

    page.goto(url)
    page.wait_for_selector("#segment-btn", timeout=timeout_s * 1000)
    page.locator("#examples button").first.click()
    wait_status(page, "Image loaded", timeout_s)
    page.click("#segment-btn")
    wait_status(page, "Segmented.", timeout_s)
    wait_idle(page, timeout_s)
    close_toasts(page)
    shown = {"model": page.input_value("#model input"), "refiner": page.input_value("#refiner input"),
             "status": page.inner_text("#status"), "legend": page.inner_text("#legend"),
             "page": page.inner_text("body")}
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / ".web_result.png"), full_page=True)
    page.get_by_role("tab", name="Correct").click()
    page.wait_for_selector("#editor canvas", timeout=timeout_s * 1000)
    page.wait_for_timeout(1500)  # the editor draws its background after the canvas appears
    paint_stroke(page, length=0.2, steps=4)
    page.mouse.move(0, 0)
    close_toasts(page)
    page.screenshot(path=str(out / ".web_correct.png"), full_page=True)
    for name in ("web_result.png", "web_correct.png"):
        os.replace(out / f".{name}", out / name)
    return shown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.web.browser", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the screenshots (e.g. docs/images)")
    p.add_argument("--store", type=Path, default=None, help="annotation store (default: a temporary folder)")
    args = p.parse_args(argv)

    from .server import build_app, launch
    from .session import WebConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = WebConfig(port=free_port(), store=args.store or Path(tmp) / "store")
        demo = build_app(cfg)
        url = launch(demo, block=False)
        try:
            with chromium_page() as page:
                shown = readme_screenshots(page, url, args.out)
        finally:
            demo.close()
            demo.finemask.close()
    print(f"screenshots in {args.out}: web_result.png, web_correct.png ({shown['model']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
