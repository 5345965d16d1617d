"""The page in a real browser: Playwright driving Debian's headless Chromium (no Playwright download)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("playwright")
from web_testkit import running_app, tiny_models, web_config

from app.web.browser import CHROMIUM, chromium_page, upload, wait_image, wait_toast, walkthrough
from app.web.session import bundled_examples
from engine.store import Store

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}")


def test_segment_refine_correct_and_save_in_the_browser(tmp_path):
    example = next(p for p in bundled_examples() if p.name == "mountains.jpg")  # the smaller bundled sample
    seg, ref = tiny_models(tmp_path)
    # A small editor size, so the example (over 2000 px wide) is edited on a preview and the
    # stroke goes through the preview -> full resolution mapping and the snap to image edges.
    config = web_config(tmp_path / "store", editor_max_side=320, display_max_side=400)
    with running_app(config, seg, ref) as (_, url), chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#segment-btn")
        bad = tmp_path / "holiday.png"
        bad.write_text("not an image")
        upload(page, bad)
        assert "holiday.png: not a readable image" in wait_toast(page, "holiday.png", 30)

        times = walkthrough(page, url, example, refine=True, shots=tmp_path, timeout_s=60)

        status = page.inner_text("#status")
        legend = page.inner_text("#legend")
        # the default brush is the first swatch: the class listed first in the editor's legend
        first_class = int(page.get_attribute("#editor-legend .fm-class", "data-class"))
        overlay_png = tmp_path / "overlay.png"
        page.get_by_role("tab", name="Result").click()
        wait_image(page, "#overlay img", 30)
        page.locator("#overlay img").first.screenshot(path=str(overlay_png))

    match = re.search(r"(\d+) pixels corrected; saved as pair (\S+) \(", status)
    assert match, status
    changed, pair_id = int(match.group(1)), match.group(2)
    assert changed > 0 and pair_id == example.stem
    store = Store.open(tmp_path / "store", create=False)
    record = store.get(pair_id)
    assert record.origin == "corrected" and record.shape == Image.open(example).size[::-1]
    _, labels = store.load(pair_id)
    h, w = labels.shape
    assert labels[h // 2, w // 2] == first_class  # the stroke (first swatch) starts at the image centre
    assert "class" in legend and "%" in legend

    for shot in ("web_result.png", "web_correct.png"):
        pixels = np.asarray(Image.open(tmp_path / shot).convert("RGB"), np.float32)
        assert pixels.shape[0] > 500 and pixels.std() > 10, f"{shot} looks blank"
    shown = np.asarray(Image.open(overlay_png).convert("RGB"))
    assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 50, "the overlay shows no image"
    assert sum(times.values()) < 120, times
