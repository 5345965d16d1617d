"""engine.assets: the shipped models and samples are found through the installed ``assets`` package."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from engine.assets import ASSETS_DIR, MODELS_DIR, SAMPLES_DIR
from engine.checkpoints import ASSETS_MODELS, shipped_models


def test_assets_folder_is_the_assets_package():
    assert ASSETS_DIR == Path(str(importlib.resources.files("assets"))).resolve()
    assert (ASSETS_DIR / "__init__.py").is_file()


def test_shipped_models_and_samples_are_there():
    assert ASSETS_MODELS == MODELS_DIR
    assert {"camvid", "refine-light"} <= set(shipped_models())
    assert (MODELS_DIR / "camvid" / "card.json").is_file()
    assert (SAMPLES_DIR / "mountains.jpg").is_file() and (SAMPLES_DIR / "ATTRIBUTION.md").is_file()
