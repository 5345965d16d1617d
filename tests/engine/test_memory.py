"""engine.memory: peak RSS sees a large allocation and can be reset."""
from __future__ import annotations

import numpy as np

from engine.memory import current_rss, peak_rss, reset_peak_rss


def test_peak_tracks_allocation_and_resets():
    before = current_rss()
    block = np.ones(200 * 2**20, np.uint8)  # touched pages: resident
    assert peak_rss() >= before + 150 * 2**20
    del block
    if reset_peak_rss():
        assert peak_rss() < before + 150 * 2**20
