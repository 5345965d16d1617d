"""Progress of a segmentation as the page reports it (issue 35, item 10): every phase (model,
network, upsampling in row strips, the views and files) moves the bar, and Cancel stops the
upsampling of a large image at its next strip."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from web_testkit import save_png, scene, tiny_models, web_config

from engine.errors import Cancelled


class Recorder:
    """Stands in for ``gr.Progress``: keeps every ((done, total), desc) it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, **kwargs):
        self.calls.append((tuple(progress), desc or ""))


class FakeRequest:
    session_hash = "progress-test"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from app.web.server import build_app

    folder = tmp_path_factory.mktemp("progress")
    seg, ref = tiny_models(folder)
    app = build_app(web_config(folder / "store", max_file_size="50mb"), model=seg, refiner=ref)
    yield app
    app.finemask.close()


def handler(demo, name):
    return next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == name)


def large_image(tmp_path):
    big = np.asarray(Image.fromarray(scene(60, 80, seed=4)).resize((1600, 1200), Image.Resampling.BILINEAR))
    return save_png(tmp_path / "large.png", big)


def test_segmentation_reports_every_phase_and_moves_forward(demo, tmp_path):
    page = demo.finemask_page
    work = handler(demo, "on_upload")(str(large_image(tmp_path)), None)[page["work"]]
    progress = Recorder()
    outputs = handler(demo, "on_segment")(work, "tiny", 64, FakeRequest(), progress)
    assert "Segmented." in outputs[page["status"]]
    messages = [desc for _, desc in progress.calls]
    for phase in ("loading the model tiny", "running the model", "upsampling to 1600x1200: rows",
                  "drawing the result", "writing the label files"):
        assert any(phase in m for m in messages), (phase, messages)
    strips = [(done, total) for (done, total), desc in progress.calls if "upsampling" in desc]
    assert len(strips) >= 4 and strips == sorted(strips) and strips[-1][0] > strips[0][0]
    assert max(done / total for (done, total), _ in progress.calls) == 1.0


def test_cancel_stops_the_upsampling_of_a_large_image(demo, tmp_path):
    bench = demo.finemask
    work = bench.open_image(large_image(tmp_path))
    seen = []

    def cancel() -> bool:  # pressed while the first row strips are being upsampled
        return sum("upsampling" in m for m in seen) >= 2

    with pytest.raises(Cancelled, match="segmentation cancelled"):
        bench.segment(work, "tiny", 64, lambda d, t, m: seen.append(m), cancel)
    assert sum("upsampling" in m for m in seen) == 2 and work.labels is None  # stopped at once; nothing kept
