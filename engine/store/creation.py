"""Making a new store whole (or leaving nothing), and removing a new store nothing was added to."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, fsync_dir
from ..errors import FineMaskError
from ..filelock import FileLock
from .files import IMAGES_DIR, LABELS_DIR, LOCK_FILE, MANIFEST, remove_quietly
from .manifest import (
    DEFAULT_HISTORY_LIMIT,
    FORMAT,
    FORMAT_VERSION,
    VALIDATION_FRACTION,
    parse_manifest,
)


def empty_manifest(history_limit: int | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": {
            "history_limit": DEFAULT_HISTORY_LIMIT if history_limit is None else int(history_limit),
            "validation_fraction": VALIDATION_FRACTION,
        },
        "pairs": [],
    }


def create_store(root: Path, history_limit: int | None, lock: FileLock) -> None:
    """Make a new store at ``root`` (which has no manifest) whole, or leave nothing behind.

    A new or empty folder is built as a hidden temporary sibling (its folders and manifest) and
    renamed into place in one step, so a full disk or a crash never leaves a store folder without
    a manifest. A folder already holding other files gets the store's folders and manifest in
    place, under the lock; what was made is removed again if that fails. Parent folders made for
    the store are removed on failure too.
    """
    text = json.dumps(empty_manifest(history_limit), indent=1) + "\n"
    made: list[Path] = []  # folders (and the lock file) made here, outermost first
    try:
        for parent in reversed(root.parents):
            _make_folder(parent, made)
        if root.is_dir() and any(root.iterdir()):
            lock_existed = lock.path.exists()
            if not lock_existed:
                made.append(lock.path)
            with lock:
                for sub in (IMAGES_DIR, LABELS_DIR):
                    _make_folder(root / sub, made)
                if not (root / MANIFEST).exists():
                    atomic_write_text(root / MANIFEST, text)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".new", dir=root.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes a private folder; a store is an ordinary one
            for sub in (IMAGES_DIR, LABELS_DIR):
                (tmp / sub).mkdir()
            atomic_write_text(tmp / MANIFEST, text)
            try:
                os.rename(tmp, root)  # replaces root only where it is an empty folder
            except OSError:
                if not (root / MANIFEST).is_file():
                    raise
                # another process made the store meanwhile: use theirs
            fsync_dir(root.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, FineMaskError) as exc:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        if isinstance(exc, FineMaskError):
            raise
        raise FineMaskError(f"cannot create the annotation store ({exc.strerror or exc})", root) from None


def _make_folder(path: Path, made: list[Path]) -> None:
    """Make ``path`` if it does not exist, noting it in ``made``."""
    if path.is_dir():
        return
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise FineMaskError("an annotation store must be a folder, this is a file", path) from None
        return
    made.append(path)


def discard_new_store(root: str | Path) -> bool:
    """Remove a store at ``root`` if it holds no pairs and no other files; True if removed.

    For callers that made a store for pairs that then could not be added (``finemask store add``
    to a new folder on a full disk): they leave no empty store behind. Anything else in the
    folder (a model, a stray file) keeps it.
    """
    root = Path(root)
    store_files = {root / MANIFEST, root / LOCK_FILE, root / IMAGES_DIR, root / LABELS_DIR}
    try:
        with FileLock(root / LOCK_FILE, timeout=5.0):
            manifest = parse_manifest((root / MANIFEST).read_text(encoding="utf-8"), root / MANIFEST)
            others = [p for p in root.iterdir() if p not in store_files]
            others += [p for sub in (IMAGES_DIR, LABELS_DIR) if (root / sub).is_dir() for p in (root / sub).iterdir()]
            if manifest["pairs"] or others:
                return False
            for sub in (IMAGES_DIR, LABELS_DIR):
                (root / sub).rmdir()
            remove_quietly([root / MANIFEST, root / LOCK_FILE])
        root.rmdir()
    except (OSError, UnicodeDecodeError, FineMaskError):
        return False
    return True
