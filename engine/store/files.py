"""A store's folder layout and the file operations its writers share."""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from ..atomic import atomic_path
from ..errors import FineMaskError
from ..hashing import chunks

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
IMAGES_DIR = "images"
LABELS_DIR = "labels"


def labels_name(pair_id: str, version: int) -> str:
    """The file (relative to the store) of labels version ``version`` of a pair."""
    return f"{LABELS_DIR}/{pair_id}.v{version:03d}.tif"


def copy_hashing(source: Path, dest: Path) -> str:
    """Copy a file atomically to ``dest``; return the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    try:
        src = open(source, "rb")  # noqa: SIM115 - closed by the with below; opened first to word its error
    except OSError as exc:
        raise FineMaskError(f"cannot read the image file ({exc.strerror})", source) from None
    with src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for chunk in chunks(src):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def remove_quietly(paths: Iterable[Path]) -> None:
    """Delete files; one already gone is no error."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
