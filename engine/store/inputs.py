"""Checking and converting what goes into a store: labels, in-memory images, pair names, origins."""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FineMaskError
from ..io import labels_from_array, read_labels
from .manifest import ORIGINS

#: Label value of pixels nobody labelled; a store accepts it whatever its class names.
UNLABELLED = 255


def check_origin(origin: str) -> None:
    """Refuse an unknown labels origin."""
    if origin not in ORIGINS:
        raise FineMaskError(f"unknown labels origin {origin!r} (use one of {', '.join(ORIGINS)})")


def safe_id(name: str) -> str:
    """A file-safe id: letters, digits, '.', '_', '-'; at most 80 characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:80]
    return safe or "pair"


def image_shape(normalised: np.ndarray) -> tuple[int, int]:
    """(H, W) of a normalised image."""
    return int(normalised.shape[0]), int(normalised.shape[1])


def image_array_to_store(image: Any) -> np.ndarray:
    """The array to write for an in-memory image: channels last, a single channel squeezed."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # same channel-first rule as engine.io.image_from_array
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., 0]  # gray + alpha: PNG cannot hold it as is and readers drop alpha anyway
    return np.ascontiguousarray(arr)


def prepare_labels(labels: Any, shape: tuple[int, int], image_file: Path, what: str) -> np.ndarray:
    """Labels as uint16 (H, W) matching ``shape``; errors name the labels file or the image."""
    if isinstance(labels, (str, Path)):
        path = Path(labels).expanduser()
        arr = read_labels(path, shape=shape)
    else:
        arr = labels_from_array(labels, image_file)
        if tuple(arr.shape) != tuple(shape):
            raise FineMaskError(
                f"labels for {what} are {arr.shape[0]}x{arr.shape[1]} (HxW) but the image is "
                f"{shape[0]}x{shape[1]}",
                image_file,
            )
    return arr.astype(np.uint16, copy=False)


def check_class_ids(
    classes: Iterable[int], class_names: list[str] | None, path: str | Path | None, *, existing: bool = False
) -> None:
    """Refuse class ids the store has no name for; ``path`` names the labels (or the image).

    Once a store names its classes, every id in its labels must be one of them, except
    :data:`UNLABELLED` (255, pixels nobody labelled), so a store never holds classes nobody can
    name and fine-tuning never meets an id outside the model's classes by accident. A store
    without names (``class_names`` None) takes any id. ``existing``: the ids are those of the
    labels already stored (the names are what is being checked).
    """
    if class_names is None:
        return
    n = len(class_names)
    unnamed = sorted({int(c) for c in classes if int(c) >= n and int(c) != UNLABELLED})
    if unnamed:
        shown = ", ".join(map(str, unnamed[:5])) + (" ..." if len(unnamed) > 5 else "")
        if existing:
            remedy = f"labels already in the store use them: give at least {unnamed[-1] + 1} names"
        else:
            remedy = "name the new classes first (Store.set_class_names, `finemask store classes`) or fix the labels"
        raise FineMaskError(
            f"class id(s) {shown} have no name in this store: it names {n} classes (ids 0..{n - 1}; "
            f"{UNLABELLED} = unlabelled); {remedy}",
            path,
        )


def labels_source(labels: Any, fallback: Path) -> Path:
    """The file to name in errors about labels: the labels file, else the image."""
    return Path(labels).expanduser() if isinstance(labels, (str, Path)) else fallback


def classes_present(labels: np.ndarray) -> list[int]:
    """Sorted class ids present in a labels array."""
    counts = np.bincount(labels.ravel(), minlength=1)
    return [int(c) for c in np.flatnonzero(counts)]
