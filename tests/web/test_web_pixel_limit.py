"""One pixel limit for every front end (issue 35, item 14): the web app's default is the
engine's, ``FINEMASK_MAX_PIXELS`` and ``--max-pixels`` change it, and a refused image says how."""
from __future__ import annotations

import pytest
from PIL import Image

from app.web.server import config_from_args, parse_args
from app.web.session import WebConfig, Workbench
from engine.errors import FineMaskError
from engine.io import DEFAULT_MAX_PIXELS, max_pixels_limit


def test_the_web_default_is_the_limit_of_every_front_end(monkeypatch, tmp_path):
    monkeypatch.delenv("FINEMASK_MAX_PIXELS", raising=False)
    assert WebConfig(store=tmp_path).pixel_limit() == DEFAULT_MAX_PIXELS == max_pixels_limit()
    monkeypatch.setenv("FINEMASK_MAX_PIXELS", "12345")
    assert WebConfig(store=tmp_path).pixel_limit() == 12345 == max_pixels_limit()
    assert config_from_args(parse_args(["--max-pixels", "999"])).pixel_limit() == 999


def test_help_states_the_shared_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{DEFAULT_MAX_PIXELS:,}" in text and "16384x16384" in text


def test_a_refused_image_says_how_to_raise_the_limit(tmp_path):
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    seg, ref = make_tiny_segmenter(tmp_path / "tiny"), make_tiny_refiner(tmp_path / "tiny-refiner")
    bench = Workbench(WebConfig(store=tmp_path / "store", max_pixels=100 * 99, examples=[]), model=seg, refiner=ref)
    try:
        Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
        with pytest.raises(FineMaskError) as info:
            bench.open_image(tmp_path / "big.png")
        text = str(info.value)
        assert text.startswith("big.png: image has 10,000 pixels, more than the limit of 9,900")
        assert "python -m app.web --max-pixels 10000" in text and "FINEMASK_MAX_PIXELS" in text
        Image.new("RGB", (99, 100)).save(tmp_path / "fits.png")
        assert bench.open_image(tmp_path / "fits.png").shape == (100, 99)
    finally:
        bench.close()
