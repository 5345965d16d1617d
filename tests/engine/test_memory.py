"""engine.memory: peak RSS sees a large allocation and can be reset; glibc's allocator settings."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from engine import memory
from engine.memory import (
    current_rss,
    limit_malloc_arenas,
    peak_rss,
    reset_peak_rss,
    reuse_freed_memory,
)


def test_peak_tracks_allocation_and_resets():
    before = current_rss()
    block = np.ones(200 * 2**20, np.uint8)  # touched pages: resident
    assert peak_rss() >= before + 150 * 2**20
    del block
    if reset_peak_rss():
        assert peak_rss() < before + 150 * 2**20


def test_reuse_freed_memory_nests_and_restores():
    with reuse_freed_memory():
        with reuse_freed_memory():
            assert memory._reuse_depth in (0, 2)  # 0 where glibc is absent
            x = torch.ones(3000, 3000)
        assert memory._reuse_depth in (0, 1)
    assert memory._reuse_depth == 0
    assert float(x.sum()) == 9e6


def test_reuse_freed_memory_disabled_changes_nothing():
    with reuse_freed_memory(enabled=False):
        assert memory._reuse_depth == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is a Linux C library")
def test_glibc_is_found_once_and_has_the_allocator_calls():
    libc = memory.glibc()
    assert libc is memory.glibc()  # looked up once
    if libc is not None:
        assert hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")


def test_malloc_arenas_are_left_alone_when_the_environment_sets_them(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
