"""The README's screenshots of the web app, written by this test (issue 35, item 14): the shipped
models on the first bundled example, the sample in its model's domain.

It writes ``docs/images/web_result.png`` and ``docs/images/web_correct.png`` after checking what
the page shows, so the README never shows a stale page.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("playwright")

from app.web.browser import CHROMIUM, chromium_page, free_port, readme_screenshots
from app.workbench.samples import sample_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}")]


def test_readme_screenshots_show_the_shipped_models_on_a_sample_of_their_domain(tmp_path):
    from app.web.server import build_app, launch
    from app.web.session import WebConfig, bundled_examples

    first = sample_for(bundled_examples()[0])
    assert first is not None and first.model == "idrid"  # the first picture is in its model's domain
    demo = build_app(WebConfig(port=free_port(), store=tmp_path / "store"))  # the shipped defaults
    url = launch(demo, block=False)
    try:
        with chromium_page() as page:
            shown = readme_screenshots(page, url, ROOT / "docs" / "images")
    finally:
        demo.close()
        demo.finemask.close()
    assert shown["model"].startswith("idrid · shipped · mIoU")
    assert shown["refiner"].startswith(demo.finemask.default_refiner) and "not installed" not in shown["page"]
    assert shown["status"].startswith("idrid_50") and "optic_disc" in shown["legend"]
    for name in ("web_result.png", "web_correct.png"):
        pixels = np.asarray(Image.open(ROOT / "docs" / "images" / name).convert("RGB"), np.float32)
        assert pixels.shape[0] > 600 and pixels.std() > 10, f"{name} looks blank"
