"""Shared helpers of the web app tests: tiny models, small images, a server on a free port."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from app.web.browser import free_port


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny 3-class segmenter and a tiny refiner saved under ``folder``."""
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    return make_tiny_segmenter(folder / "tiny"), make_tiny_refiner(folder / "tiny-refiner")


def web_config(store: Path, **overrides):
    """WebConfig for tests: a free loopback port, small views, a 2-step fine-tuning."""
    from app.web.session import WebConfig
    from training.finetune import FinetuneConfig

    settings = dict(host="127.0.0.1", port=free_port(), store=store, display_max_side=256, editor_max_side=256,
                    max_file_size="1mb", finetune=FinetuneConfig(steps=2, batch_size=2, crop=(64, 64)))
    settings.update(overrides)
    return WebConfig(**settings)




@contextmanager
def running_app(config, model: Path, refiner: Path | None):
    """Build and start the app (not blocking); yield (demo, url); stop it afterwards."""
    from app.web.server import build_app, launch

    demo = build_app(config, model=model, refiner=refiner if refiner is not None else "no-such-refiner")
    url = launch(demo, block=False)
    try:
        yield demo, url
    finally:
        demo.close()
        demo.finemask.close()


def scene(h: int = 48, w: int = 72, seed: int = 0) -> np.ndarray:
    """A small uint8 RGB picture: two regions of different colour, a square, some noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    img[:, : w // 2] = (0.2, 0.3, 0.8)
    img[:, w // 2:] = (0.8, 0.7, 0.2)
    img[h // 4: h // 2, w // 5: w // 5 + h // 4] = (0.9, 0.1, 0.1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path
