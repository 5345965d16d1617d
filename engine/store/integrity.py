"""Checking the files a manifest names: missing, altered, outside the store, or orphans.

Nothing here changes the store: the checks report :class:`StoreProblem` s, and a path the
manifest names outside the store's ``images/`` or ``labels/`` folder (symlinks resolved) is never
stat-ed, hashed, read or deleted.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FineMaskError
from ..hashing import file_sha256
from .files import IMAGES_DIR, LABELS_DIR, MANIFEST
from .records import StoreProblem


class FileHashes:
    """SHA-256 of files, cached by (size, mtime) so unchanged files are read once."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int, str]] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        cached = self._cache.get(path)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self._cache[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest


def inside(root: Path, rel: str, sub: str, real_root: Path | None = None) -> Path | None:
    """``root/rel`` if, symlinks resolved, it lies inside the store's ``sub`` folder, else None."""
    real_root = root.resolve() if real_root is None else real_root
    try:
        real = (root / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    folder = real_root / sub
    return root / rel if real != folder and real.is_relative_to(folder) else None


def refuse_outside(root: Path, entry: dict[str, Any]) -> None:
    """Raise if the manifest names any file of ``entry`` outside the store (nothing is changed)."""
    real_root = root.resolve()
    named = [(entry["image"], IMAGES_DIR), (entry["labels"], LABELS_DIR)]
    named += [(v["labels"], LABELS_DIR) for v in entry["history"]]
    for rel, sub in named:
        if inside(root, rel, sub, real_root) is None:
            raise FineMaskError(
                f"pair {entry['id']!r}: the manifest names {rel!r}, which is not inside the store's {sub}/ "
                "folder; nothing was changed (fix or remove the pair in the manifest)",
                root / MANIFEST,
            )


def stray_files(root: Path) -> Iterator[Path]:
    """Files in images/ and labels/, and temporary manifests: candidates for orphans.

    A sub-folder that is a symlink is not listed (its files are not the store's to delete).
    """
    for sub in (IMAGES_DIR, LABELS_DIR):
        folder = root / sub
        if folder.is_dir() and not folder.is_symlink():
            yield from (p for p in sorted(folder.iterdir()) if p.is_file())
    yield from sorted(root.glob(f".{Path(MANIFEST).stem}.*.tmp*"))


def check_files(root: Path, manifest: dict[str, Any], full: bool,
                hashes: FileHashes) -> tuple[list[StoreProblem], dict[str, str]]:
    """The problems of the files ``manifest`` names, and the unusable pairs (id -> why).

    Current labels are hashed; images and earlier labels versions only with ``full`` (else their
    sizes are compared). Files in the store that the manifest does not name are orphans.
    """
    problems: list[StoreProblem] = []
    bad: dict[str, str] = {}
    referenced: set[Path] = set()

    def report(kind: str, path: Path, message: str, pair_id: str, pair_still_usable: bool) -> None:
        problems.append(StoreProblem(kind, path, message, pair_id))
        if not pair_still_usable:
            bad.setdefault(pair_id, f"{path}: {message}")

    real_root = root.resolve()
    for rec in manifest["pairs"]:
        rid = rec["id"]
        files = [(rec["image"], IMAGES_DIR, rec["image_sha256"], rec["image_bytes"], full, False)]
        files.append((rec["labels"], LABELS_DIR, rec["labels_sha256"], rec.get("labels_bytes"), True, False))
        files += [(v["labels"], LABELS_DIR, v["labels_sha256"], v.get("labels_bytes"), full, True)
                  for v in rec["history"]]
        for rel, sub, sha, size, hash_it, earlier in files:
            what = "earlier labels version" if earlier else "file"
            path = inside(root, rel, sub, real_root)
            if path is None:  # never stat, hash, read or delete it: the pair is unusable
                report("outside", root / rel, f"{what} of pair {rid!r} is named by the manifest as "
                       f"{rel!r}, which is not inside the store's {sub}/ folder; the pair is not used",
                       rid, False)
                continue
            referenced.add(path)
            try:
                actual_size = path.stat().st_size
            except FileNotFoundError:
                report("missing", path, f"{what} of pair {rid!r} is missing", rid, earlier)
                continue
            if size is not None and actual_size != size:
                report("altered", path, f"{what} of pair {rid!r} changed size since it was stored", rid, earlier)
            elif hash_it and hashes(path) != sha:
                report("altered", path, f"{what} of pair {rid!r} does not match its SHA-256", rid, earlier)
    for path in stray_files(root):
        if path not in referenced:
            message = "not in the manifest (left by an interrupted write); ignored"
            problems.append(StoreProblem("orphan", path, message))
    return problems, bad
