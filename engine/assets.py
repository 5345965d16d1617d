"""Files shipped with FineMask in the ``assets`` package: models and sample images.

Found through ``importlib.resources``, so they are where the installed package put them (a
source checkout, an editable install or site-packages alike).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The ``assets`` package folder.
ASSETS_DIR = Path(str(files("assets"))).resolve()
#: Shipped models, one folder per name (``engine.checkpoints``).
MODELS_DIR = ASSETS_DIR / "models"
#: Sample images and their terms (``ATTRIBUTION.md``).
SAMPLES_DIR = ASSETS_DIR / "samples"
