"""Class names and palette a label file carries: TIFF description JSON or PNG text chunk."""
from __future__ import annotations

import json
from pathlib import Path

import tifffile
from PIL import Image

from .tiff import tifffile_log

#: Key of the class names and palette in a label file (TIFF description JSON, PNG text chunk).
LABEL_INFO_KEY = "finemask"


def label_info_json(classes: list[str] | None, palette: list[list[int]] | None) -> str:
    """The ``finemask`` JSON of a label file ("" when there is nothing to carry); 7-bit ASCII."""
    info: dict[str, list] = {}
    if classes:
        info["classes"] = [str(c) for c in classes]
    if palette:
        info["palette"] = [[int(v) for v in c[:3]] for c in palette]
    return json.dumps({LABEL_INFO_KEY: info}, ensure_ascii=True) if info else ""


def read_label_info(path: str | Path) -> dict[str, list]:
    """Class names and palette a label file carries (:func:`write_labels`): ``{"classes": [...],
    "palette": [[r, g, b], ...]}`` with the keys present; ``{}`` for a file without them.

    A PNG's palette counts only with its names (every palette PNG has 256 colours)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile_log(), tifffile.TiffFile(path) as tif:
                text = tif.pages[0].description if tif.pages else ""
        else:
            with Image.open(path) as img:
                text = img.text.get(LABEL_INFO_KEY, "") if hasattr(img, "text") else ""
                flat = img.getpalette() if img.mode == "P" else None
    except Exception:  # noqa: BLE001 - an unreadable file carries nothing; reading it says why
        return {}
    try:
        data = json.loads(text).get(LABEL_INFO_KEY) if text.lstrip().startswith("{") else None
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, list] = {}
    classes = data.get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        out["classes"] = list(classes)
    palette = data.get("palette")
    if path.suffix.lower() == ".png" and "classes" in out and flat:
        palette = [flat[3 * i: 3 * i + 3] for i in range(min(len(out["classes"]), len(flat) // 3))]
    if isinstance(palette, list) and all(isinstance(c, list) and len(c) == 3 and
                                         all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette):
        out["palette"] = [list(c) for c in palette]
    return out
