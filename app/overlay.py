"""Colour overlays of label maps, shared by the CLI demo and the front ends."""
from __future__ import annotations

import numpy as np


def colorize(labels: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ids beyond the palette are black."""
    lut = np.zeros((max(int(labels.max()) + 1, len(palette)), 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return lut[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette: list[list[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over a float [0, 1] RGB image; returns uint8 (H, W, 3)."""
    colours = colorize(labels, palette).astype(np.float32) / 255.0
    return (np.clip((1 - alpha) * image + alpha * colours, 0, 1) * 255 + 0.5).astype(np.uint8)
