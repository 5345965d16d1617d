"""Writer for Labels layers: FineMask class labels as a uint16 zlib TIFF.

Layer value k is written as class k - 1 and 0 (unlabelled) as 255, the inverse of the reader,
so a file written here opens as the same layer and goes into a store or ``finemask`` as is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FineMaskError

from .logic import layer_to_classes


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: write ``data`` (a 2-D Labels layer) to ``path`` (.tif/.tiff)."""
    from engine.io import write_labels as write

    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        raise FineMaskError("FineMask writes labels as .tif or .tiff", target)
    values = np.asarray(data)
    info = (meta or {}).get("metadata", {}).get("finemask", {})
    classes = info.get("classes")
    labels = layer_to_classes(values, len(classes) if classes else None).astype(np.uint16)
    write(target, labels)
    return [str(target)]
