"""The sample images shipped in ``assets/samples`` and the model each one is for.

``assets/samples/samples.json`` names, per file, the model whose domain the picture is in and a
short label that says so honestly (a picture outside every shipped model's domain says what the
model makes of it). Both front ends list the samples from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.assets import SAMPLES_DIR
from engine.io import IMAGE_SUFFIXES

#: The file beside the samples that says which model each one is for.
SAMPLES_FILE = "samples.json"


@dataclass(frozen=True)
class Sample:
    """A bundled sample: ``model`` it is for, ``label`` to show, ``about``: one sentence on it."""

    path: Path
    model: str | None
    label: str
    about: str = ""


def _described(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / SAMPLES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def sample_for(path: str | Path) -> Sample | None:
    """The description of a bundled sample file (None for any other file)."""
    path = Path(path)
    entry = _described(path.parent).get(path.name)
    if entry is None:
        return None
    model = entry.get("model")
    label, about = str(entry.get("label") or path.name), str(entry.get("about") or "")
    return Sample(path, str(model) if model else None, label, about)


def bundled_samples(folder: Path = SAMPLES_DIR) -> list[Sample]:
    """The described samples in ``folder``, in the order ``samples.json`` lists them."""
    if not folder.is_dir():
        return []
    found = []
    for name in _described(folder):
        path = folder / name
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            sample = sample_for(path)
            if sample is not None:
                found.append(sample)
    return found


__all__ = ["SAMPLES_FILE", "Sample", "bundled_samples", "sample_for"]
