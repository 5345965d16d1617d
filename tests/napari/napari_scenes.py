"""Small synthetic images for the napari plugin tests."""
from __future__ import annotations

import numpy as np


def make_scene(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 (h, w, 3): bright sky on top, dark ground, a red box: clear boundaries to refine."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 3] = (170, 200, 240)
    img[h // 3:] = (60, 90, 40)
    img[h // 2: h // 2 + h // 4, w // 3: w // 3 + w // 4] = (200, 30, 30)
    return np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
