"""Fixtures for the napari plugin tests: tiny models, a tiny scene, isolated settings."""
from __future__ import annotations

import numpy as np
import pytest
from napari_scenes import make_scene


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """The plugin remembers the store folder; never in the real user config here."""
    monkeypatch.setenv("FINEMASK_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(segmenter folder, refiner folder): tiny random models, 3 classes."""
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "tiny-seg", num_classes=3), make_tiny_refiner(root / "tiny-ref")


@pytest.fixture
def scene() -> np.ndarray:
    return make_scene()


@pytest.fixture
def notifications():
    """Every napari notification shown during the test."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)
