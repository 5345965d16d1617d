"""Sample data: the two shipped sample images in ``assets/samples`` (terms in ATTRIBUTION.md)."""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.assets import SAMPLES_DIR
from engine.errors import FineMaskError

SAMPLES = SAMPLES_DIR
ATTRIBUTION = SAMPLES / "ATTRIBUTION.md"


def attribution(filename: str) -> str:
    """The source and terms of a sample, as its row in ATTRIBUTION.md says ("" if absent)."""
    try:
        lines = ATTRIBUTION.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].strip("`") == filename:
            return f"{cells[1]} — {cells[2]}"
    return ""


def load_sample(filename: str, name: str) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """One sample as napari layer data: uint8 (H, W, 3) RGB, attribution in the metadata."""
    from PIL import Image

    path = SAMPLES / filename
    if not path.is_file():
        raise FineMaskError("sample image is not installed with this copy of FineMask", path)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    meta = {"name": name, "metadata": {"source_file": str(path), "attribution": attribution(filename)}}
    return [(rgb, meta, "image")]


def outdoor_scene() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Outdoor photo (mountains, forest, sky), public domain. Not a street scene: the shipped camvid
    model (street scenes) labels much of it Building."""
    return load_sample("mountains.jpg", "outdoor")


def fundus_4k() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """IDRiD_50 retinal fundus photo, 4288x2848, CC BY 4.0 (Porwal et al. 2018)."""
    return load_sample("idrid_50.jpg", "fundus 4K")
