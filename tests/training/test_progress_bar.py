"""The CLI progress bar of a resumed run counts only the current sitting's steps."""

import io
import time

from tqdm import tqdm

from training.launch import _advance


def test_resumed_bar_rate_counts_this_sitting_only():
    bar = tqdm(total=1000, file=io.StringIO(), unit="step", mininterval=0)
    for step in range(801, 806):  # a run resumed at step 800, one step per 20 ms
        time.sleep(0.02)
        _advance(bar, step)
    info = bar.format_dict
    assert info["n"] == 805 and info["initial"] == 800
    rate = (info["n"] - info["initial"]) / info["elapsed"]
    assert 10 < rate < 200, rate  # about 50 steps/s; a bar counting from 0 shows about 8000
    assert "805/1000" in str(bar)


def test_fresh_bar_counts_from_zero():
    bar = tqdm(total=10, file=io.StringIO(), unit="step")
    for step in range(1, 4):
        _advance(bar, step)
    assert bar.format_dict["n"] == 3 and bar.format_dict["initial"] == 0
