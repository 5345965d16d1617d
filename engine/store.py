"""Annotation store: image/label pairs that users corrected, kept safe for fine-tuning.

A store is a folder::

    project/
      manifest.json          the only index; written last, always by an atomic rename
      .lock                  lock file serialising writers (content unused)
      images/<id>.<ext>      image bytes (copied from the user's file, or written from an array)
      labels/<id>.v<N>.tif   one uint16 zlib TIFF per labels version; never overwritten

Crash safety. A labels version is written to a new file name, never over the current one, and
every file goes to a temporary name first and is renamed into place (``engine.atomic``). The
manifest is renamed into place last, so the manifest always describes a complete old state or a
complete new one. A crash before the manifest rename leaves only unreferenced files; a crash after
it leaves only files that were to be deleted. Both are reported as ``"orphan"`` problems, ignored,
and removed by :meth:`Store.clean`. Files the manifest names but that are missing or whose
SHA-256 does not match are reported too, and their pairs are left out of :meth:`Store.pairs`.
A new store is built in a hidden sibling folder and renamed into place once its manifest is
written, so a failed creation leaves nothing.

Untrusted manifest. The manifest is checked field by field on every read
(``engine.store_manifest``: one error naming ``manifest.json`` and the field). A path it names
must lie, symlinks resolved, inside the store's ``images/`` or ``labels/`` folder; otherwise the
pair is reported as an ``"outside"`` problem and the store never reads, changes or deletes it.

Concurrency. Every change takes the store's lock file, re-reads the manifest under it, changes
it and writes it back, so two processes (say the napari plugin and the web app) never lose each
other's updates. Readers need no lock: they only ever see a whole manifest.

Splits. Each pair gets a split when it is added and keeps it forever (see :func:`assign_split`):
about one pair in five goes to validation, chosen by image hash, and never more than that share.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .errors import FineMaskError
from .filelock import FileLock
from .io import image_from_array, labels_from_array, read_image, read_labels, write_image, write_labels
from .store_manifest import (
    DEFAULT_HISTORY_LIMIT,
    FORMAT,
    FORMAT_VERSION,
    ORIGINS,
    SPLITS,
    VALIDATION_FRACTION,
    parse_manifest,
)

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
IMAGES_DIR = "images"
LABELS_DIR = "labels"
#: Label value of pixels nobody labelled; a store accepts it whatever its class names.
UNLABELLED = 255
#: From this many pairs on, at least one pair is in validation.
MIN_PAIRS_FOR_VALIDATION = 5
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LabelVersion:
    """One labels version of a pair. ``time`` is when it was written (ISO 8601, UTC)."""

    labels_path: Path
    labels_sha256: str
    classes: tuple[int, ...]
    origin: str
    model_version: str | None
    time: str


@dataclass(frozen=True)
class PairRecord:
    """An image/labels pair as the manifest describes it; paths are absolute.

    ``shape`` is (H, W) in pixels; ``classes`` the class ids present in the current labels;
    ``problem`` says why the pair cannot be used (missing or altered file), else None.
    """

    id: str
    image_path: Path
    labels_path: Path
    image_sha256: str
    labels_sha256: str
    shape: tuple[int, int]
    classes: tuple[int, ...]
    origin: str
    model_version: str | None
    created: str
    updated: str
    split: str
    history_length: int
    problem: str | None = None


@dataclass(frozen=True)
class StoreProblem:
    """A file the store cannot use.

    ``kind``: ``"orphan"`` (a file no manifest entry names: left by a crash, ignored),
    ``"missing"`` (named but absent), ``"altered"`` (size or SHA-256 differs from the manifest) or
    ``"outside"`` (the manifest names a path that, symlinks resolved, is not in the store's
    ``images/`` or ``labels/`` folder: the pair is never read, changed or deleted).
    """

    kind: str
    path: Path
    message: str
    pair_id: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def assign_split(image_sha256: str, existing: Iterable[dict[str, Any]], fraction: float = VALIDATION_FRACTION) -> str:
    """The split of a new pair, given the records already in the store.

    Rule, applied once when a pair is added (the result is stored and never changed, so adding
    pairs never moves existing ones):

    1. an image already in the store gets the split of that pair (no image in both splits);
    2. else the pair goes to validation when its :func:`split_score` (the leading bits of the image
       SHA-256 read as a fraction in [0, 1)) is below ``fraction`` and validation holds fewer
       than ``floor(fraction * n)`` of the ``n`` pairs the store will hold (so a small store
       keeps its first pairs for training, and chance never puts most pairs in validation);
    3. else, if the store will hold ``MIN_PAIRS_FOR_VALIDATION`` or more pairs and none is in
       validation yet, the pair goes to validation (so a store of 5 has at least one);
    4. else train.
    """
    existing = list(existing)
    for rec in existing:
        if rec["image_sha256"] == image_sha256:
            return rec["split"]
    n = len(existing) + 1
    in_validation = sum(r["split"] == "validation" for r in existing)
    if split_score(image_sha256) < fraction and in_validation < int(fraction * n + 1e-9):
        return "validation"
    if n >= MIN_PAIRS_FOR_VALIDATION and in_validation == 0:
        return "validation"
    return "train"


def split_score(sha256_hex: str) -> float:
    """A number in [0, 1) fixed by a SHA-256 hex digest (its first 53 bits, exact in a float)."""
    return (int(sha256_hex[:16], 16) >> 11) / 2.0**53


class Store:
    """An annotation store folder. Create or open one with :meth:`Store.open`."""

    def __init__(self, root: Path, *, lock_timeout: float = 60.0):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self._lock = FileLock(self.root / LOCK_FILE, timeout=lock_timeout)
        self._manifest: dict[str, Any] = {}
        self._manifest_key: tuple[int, int, int] | None = None
        self._problems: list[StoreProblem] = []
        self._bad_pairs: dict[str, str] = {}
        self._hash_cache: dict[Path, tuple[int, int, str]] = {}
        self._state_lock = threading.RLock()  # one Store may be shared by a UI's threads

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        create: bool = True,
        *,
        history_limit: int | None = None,
        lock_timeout: float = 60.0,
    ) -> "Store":
        """Open the store at ``path``; with ``create`` make it (folders and an empty manifest).

        ``history_limit``: previous labels versions kept per pair (default 10); when given it is
        saved in the manifest, so every process trims the same way, and applies from each
        pair's next change. ``lock_timeout``: seconds to wait for another writer.
        """
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise FineMaskError("an annotation store must be a folder, this is a file", root)
        store = cls(root, lock_timeout=lock_timeout)
        if history_limit is not None and (
            not isinstance(history_limit, int) or isinstance(history_limit, bool) or history_limit < 0
        ):
            raise FineMaskError(f"history_limit must be a whole number >= 0, got {history_limit!r}", root)
        if not store.manifest_path.exists():
            if not create:
                raise FineMaskError(f"not a FineMask annotation store (no {MANIFEST})", root)
            _create_store(root, history_limit, store._lock)
        elif history_limit is not None:
            with store._lock:
                manifest = store._read_manifest()
                if manifest["settings"]["history_limit"] != int(history_limit):
                    manifest["settings"]["history_limit"] = int(history_limit)
                    store._write_manifest(manifest)
        store._refresh(force=True)
        return store

    # --- reading ---------------------------------------------------------------------------

    @property
    def history_limit(self) -> int:
        """Previous labels versions kept per pair."""
        self._refresh()
        return int(self._manifest["settings"]["history_limit"])

    @property
    def class_names(self) -> list[str] | None:
        """Names of the store's class ids (index = id), or None until someone sets them."""
        self._refresh()
        names = self._manifest["settings"].get("class_names")
        return None if names is None else list(names)

    def set_class_names(self, names: Iterable[str]) -> None:
        """Name the store's class ids (index = id); fine-tuned models take these names."""
        names = [str(n) for n in names]
        if not names or any(not n.strip() for n in names):
            raise FineMaskError("class names must be a non-empty list of non-empty names", self.root)
        with self._locked():
            manifest = self._read_manifest()
            used = sorted({int(c) for r in manifest["pairs"] for c in r["classes"]})
            check_class_ids(used, names, self.manifest_path, existing=True)  # stored ids keep their names
            manifest["settings"]["class_names"] = names
            self._write_manifest(manifest)

    @property
    def problems(self) -> list[StoreProblem]:
        """Files the store cannot use (orphans, missing or altered files), as last checked."""
        self._refresh()
        return list(self._problems)

    def __len__(self) -> int:
        self._refresh()
        return len(self._manifest["pairs"])

    def __contains__(self, pair_id: object) -> bool:
        self._refresh()
        return any(r["id"] == pair_id for r in self._manifest["pairs"])

    def ids(self) -> list[str]:
        """All pair ids in the order they were added (usable or not)."""
        self._refresh()
        return [r["id"] for r in self._manifest["pairs"]]

    def pairs(self, split: str | None = None) -> list[PairRecord]:
        """Usable pairs in the order they were added; ``split`` is None, "train" or "validation"."""
        if split is not None and split not in SPLITS:
            raise FineMaskError(f"unknown split {split!r} (use one of {', '.join(SPLITS)})")
        self._refresh()
        return [
            self._record(r)
            for r in self._manifest["pairs"]
            if r["id"] not in self._bad_pairs and (split is None or r["split"] == split)
        ]

    def get(self, pair_id: str) -> PairRecord:
        """The record of one pair (also of an unusable one: see ``problem``)."""
        self._refresh()
        return self._record(self._find(self._manifest, pair_id))

    def history(self, pair_id: str) -> list[LabelVersion]:
        """Previous labels versions of a pair, newest first (the current one not included)."""
        self._refresh()
        rec = self._find(self._manifest, pair_id)
        return [self._version(v) for v in rec["history"]]

    def load(self, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Read a pair: image float32 (H, W, 3) in [0, 1] and labels uint16 (H, W)."""
        for attempt in range(2):
            rec = self.get(pair_id)
            if rec.problem is not None:
                raise FineMaskError(f"pair {pair_id!r} cannot be used: {rec.problem}", self._bad_path(rec))
            if attempt == 0 and not (rec.labels_path.exists() and rec.image_path.exists()):
                self._refresh(force=True)  # another process may have just changed the pair
                continue
            image = read_image(rec.image_path)
            labels = read_labels(rec.labels_path, shape=rec.shape)
            return image, labels.astype(np.uint16, copy=False)
        raise AssertionError("unreachable")  # pragma: no cover

    def classes(self) -> list[int]:
        """Sorted union of the class ids present in the usable pairs' current labels."""
        found: set[int] = set()
        for rec in self.pairs():
            found.update(rec.classes)
        return sorted(found)

    def content_hash(self) -> str:
        """SHA-256 (hex) over id, split, image hash and labels hash of every usable pair.

        It changes whenever a pair is added, relabelled or undone, and only then: fine-tuned
        model cards cite it to name the data they were trained on.
        """
        rows = sorted((r.id, r.split, r.image_sha256, r.labels_sha256) for r in self.pairs())
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode("utf-8")).hexdigest()

    def check(self, full: bool = False) -> list[StoreProblem]:
        """Re-check every file now; ``full`` also hashes images and earlier labels versions.

        By default current labels are hashed and images and earlier versions only checked by size.
        """
        self._refresh(force=True, full=full)
        return list(self._problems)

    # --- writing ---------------------------------------------------------------------------

    def add(
        self,
        image: str | Path | np.ndarray,
        labels: str | Path | np.ndarray,
        origin: str,
        model_version: str | None = None,
        name: str | None = None,
    ) -> str:
        """Add an image and its labels; return the new pair's id.

        ``image``: a path to an image file (its bytes are copied) or an array (written as PNG
        when uint8, else zlib TIFF). ``labels``: (H, W) class ids as an array or a label file,
        of the image's size. ``origin``: one of "predicted", "refined", "corrected".
        ``name``: the id to use (made file-safe); it must be new. Without it the id is the image
        file's name, or "pair", with "-2", "-3", ... appended when taken.
        """
        _check_origin(origin)
        if isinstance(image, (str, Path)):
            source: Path | None = Path(image).expanduser()
            shape = _image_shape(read_image(source))
            suffix = ".jpg" if source.suffix.lower() == ".jpeg" else source.suffix.lower()
            array = None
        else:
            source = None
            array = _image_array_to_store(image)
            shape = _image_shape(image_from_array(array))
            suffix = ".png" if array.dtype == np.uint8 else ".tif"
        label_array = _prepare_labels(labels, shape, source if source is not None else self.root, what="new pair")
        classes = _classes_present(label_array)
        base = _safe_id(name if name is not None else (source.stem if source is not None else "pair"))

        with self._locked():
            manifest = self._read_manifest()
            check_class_ids(classes, manifest["settings"].get("class_names"),
                            _labels_source(labels, source if source is not None else self.root))
            pair_id = self._new_id(manifest, base, must_be_new=name is not None)
            image_rel = f"{IMAGES_DIR}/{pair_id}{suffix}"
            labels_rel = _labels_name(pair_id, 1)
            written: list[Path] = []
            try:
                image_path = self.root / image_rel
                written.append(image_path)
                if source is not None:
                    image_sha = _copy_hashing(source, image_path)
                else:
                    write_image(image_path, array)
                    image_sha = self._hash(image_path)
                labels_path = self.root / labels_rel
                written.append(labels_path)
                write_labels(labels_path, label_array)
                now = _now()
                manifest["pairs"].append(
                    {
                        "id": pair_id,
                        "image": image_rel,
                        "image_sha256": image_sha,
                        "image_bytes": image_path.stat().st_size,
                        "labels": labels_rel,
                        "labels_sha256": self._hash(labels_path),
                        "labels_bytes": labels_path.stat().st_size,
                        "shape": list(shape),
                        "classes": classes,
                        "origin": origin,
                        "model_version": model_version,
                        "created": now,
                        "updated": now,
                        "split": assign_split(
                            image_sha, manifest["pairs"], manifest["settings"]["validation_fraction"]
                        ),
                        "history": [],
                        "next_version": 2,
                    }
                )
                self._write_manifest(manifest)
            except BaseException:
                _remove_quietly(written)
                raise
        return pair_id

    def update(
        self,
        pair_id: str,
        labels: str | Path | np.ndarray,
        origin: str = "corrected",
        model_version: str | None = None,
    ) -> PairRecord:
        """Give a pair new labels; the previous version goes to its history (bounded)."""
        _check_origin(origin)
        rec = self.get(pair_id)
        label_array = _prepare_labels(labels, rec.shape, rec.image_path, what=f"pair {pair_id!r}")
        classes = _classes_present(label_array)
        with self._locked():
            manifest = self._read_manifest()
            entry = self._find(manifest, pair_id)
            self._refuse_outside(entry)
            check_class_ids(classes, manifest["settings"].get("class_names"), _labels_source(labels, rec.image_path))
            version = entry["next_version"]
            named = {entry["labels"], *(v["labels"] for v in entry["history"])}
            while _labels_name(pair_id, version) in named:
                version += 1  # a hand-edited next_version never overwrites a stored version
            labels_rel = _labels_name(pair_id, version)
            labels_path = self.root / labels_rel
            try:
                write_labels(labels_path, label_array)
                limit = int(manifest["settings"]["history_limit"])
                history = [_current_version(entry)] + entry["history"]
                dropped = history[limit:]
                entry.update(
                    labels=labels_rel,
                    labels_sha256=self._hash(labels_path),
                    labels_bytes=labels_path.stat().st_size,
                    classes=classes,
                    origin=origin,
                    model_version=model_version,
                    updated=_now(),
                    history=history[:limit],
                    next_version=version + 1,
                )
                self._write_manifest(manifest)
            except BaseException:
                _remove_quietly([labels_path])
                raise
            self._delete_unreferenced(manifest, [v["labels"] for v in dropped])
        return self.get(pair_id)

    def undo(self, pair_id: str) -> PairRecord:
        """Go back to a pair's previous labels version; the current one is discarded."""
        with self._locked():
            manifest = self._read_manifest()
            entry = self._find(manifest, pair_id)
            self._refuse_outside(entry)
            if not entry["history"]:
                raise FineMaskError(f"pair {pair_id!r} has no earlier labels version to go back to", self.manifest_path)
            previous = entry["history"][0]
            path = self.root / previous["labels"]
            if not path.is_file():
                raise FineMaskError("the earlier labels version is missing", path)
            if self._hash(path) != previous["labels_sha256"]:
                raise FineMaskError("the earlier labels version was altered (SHA-256 differs)", path)
            discarded = entry["labels"]
            entry.update(
                labels=previous["labels"],
                labels_sha256=previous["labels_sha256"],
                labels_bytes=previous.get("labels_bytes", path.stat().st_size),
                classes=previous["classes"],
                origin=previous["origin"],
                model_version=previous["model_version"],
                updated=_now(),
                history=entry["history"][1:],
            )
            self._write_manifest(manifest)
            self._delete_unreferenced(manifest, [discarded])
        return self.get(pair_id)

    def clean(self) -> list[Path]:
        """Delete orphan files (left by crashes); return what was deleted."""
        with self._locked():
            self._refresh(force=True)
            orphans = [p.path for p in self._problems if p.kind == "orphan"]
            _remove_quietly(orphans)
            self._refresh(force=True)
        return orphans

    # --- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock; turn OS errors while writing into FineMaskError; reload afterwards."""
        with self._lock:
            try:
                yield
            except OSError as exc:
                where = exc.filename or self.root
                raise FineMaskError(f"cannot write to the annotation store ({exc.strerror or exc})", where) from None
            finally:
                self._manifest_key = None  # whatever happened, re-read on the next access

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest, checked field by field (``engine.store_manifest``)."""
        path = self.manifest_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FineMaskError(f"not a FineMask annotation store (no {MANIFEST})", self.root) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FineMaskError(f"store manifest is not readable ({exc})", path) from None
        return parse_manifest(text, path)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1) + "\n")

    def _refresh(self, force: bool = False, full: bool = False) -> None:
        """Re-read the manifest if it changed on disk, and re-check the files it names."""
        try:
            st = self.manifest_path.stat()
        except FileNotFoundError:
            raise FineMaskError(f"not a FineMask annotation store (no {MANIFEST})", self.root) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._state_lock:
            if not force and key == self._manifest_key:
                return
            manifest = self._read_manifest()
            self._check_files(manifest, full)
            self._manifest, self._manifest_key = manifest, key

    def _check_files(self, manifest: dict[str, Any], full: bool) -> None:
        problems: list[StoreProblem] = []
        bad: dict[str, str] = {}
        referenced: set[Path] = set()

        def report(kind: str, path: Path, message: str, pair_id: str, pair_still_usable: bool) -> None:
            problems.append(StoreProblem(kind, path, message, pair_id))
            if not pair_still_usable:
                bad.setdefault(pair_id, f"{path}: {message}")

        real_root = self.root.resolve()
        for rec in manifest["pairs"]:
            rid = rec["id"]
            files = [(rec["image"], IMAGES_DIR, rec["image_sha256"], rec["image_bytes"], full, False)]
            files.append((rec["labels"], LABELS_DIR, rec["labels_sha256"], rec.get("labels_bytes"), True, False))
            files += [(v["labels"], LABELS_DIR, v["labels_sha256"], v.get("labels_bytes"), full, True)
                      for v in rec["history"]]
            for rel, sub, sha, size, hash_it, earlier in files:
                what = "earlier labels version" if earlier else "file"
                path = self._inside(rel, sub, real_root)
                if path is None:  # never stat, hash, read or delete it: the pair is unusable
                    report("outside", self.root / rel, f"{what} of pair {rid!r} is named by the manifest as "
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
                elif hash_it and self._hash(path) != sha:
                    report("altered", path, f"{what} of pair {rid!r} does not match its SHA-256", rid, earlier)
        for path in self._stray_files():
            if path not in referenced:
                message = "not in the manifest (left by an interrupted write); ignored"
                problems.append(StoreProblem("orphan", path, message))
        self._problems = problems
        self._bad_pairs = bad

    def _inside(self, rel: str, sub: str, real_root: Path | None = None) -> Path | None:
        """``root/rel`` if, symlinks resolved, it lies inside the store's ``sub`` folder, else None."""
        real_root = self.root.resolve() if real_root is None else real_root
        try:
            real = (self.root / rel).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return None
        folder = real_root / sub
        return self.root / rel if real != folder and real.is_relative_to(folder) else None

    def _refuse_outside(self, entry: dict[str, Any]) -> None:
        """Raise if the manifest names any file of ``entry`` outside the store (nothing is changed)."""
        real_root = self.root.resolve()
        named = [(entry["image"], IMAGES_DIR), (entry["labels"], LABELS_DIR)]
        named += [(v["labels"], LABELS_DIR) for v in entry["history"]]
        for rel, sub in named:
            if self._inside(rel, sub, real_root) is None:
                raise FineMaskError(
                    f"pair {entry['id']!r}: the manifest names {rel!r}, which is not inside the store's {sub}/ "
                    "folder; nothing was changed (fix or remove the pair in the manifest)",
                    self.manifest_path,
                )

    def _stray_files(self) -> Iterator[Path]:
        """Files in images/ and labels/, and temporary manifests: candidates for orphans.

        A sub-folder that is a symlink is not listed (its files are not the store's to delete).
        """
        for sub in (IMAGES_DIR, LABELS_DIR):
            folder = self.root / sub
            if folder.is_dir() and not folder.is_symlink():
                yield from (p for p in sorted(folder.iterdir()) if p.is_file())
        yield from sorted(self.root.glob(f".{Path(MANIFEST).stem}.*.tmp*"))

    def _hash(self, path: Path) -> str:
        """SHA-256 of a file, cached by (size, mtime) so unchanged files are read once."""
        st = path.stat()
        cached = self._hash_cache.get(path)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        digest = _sha256_file(path)
        self._hash_cache[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def _find(self, manifest: dict[str, Any], pair_id: str) -> dict[str, Any]:
        for rec in manifest["pairs"]:
            if rec["id"] == pair_id:
                return rec
        raise FineMaskError(f"no pair {pair_id!r} in this store", self.manifest_path)

    def _new_id(self, manifest: dict[str, Any], base: str, must_be_new: bool) -> str:
        taken = {r["id"].lower() for r in manifest["pairs"]}  # case-insensitive file systems
        if base.lower() not in taken:
            return base
        if must_be_new:
            raise FineMaskError(f"a pair named {base!r} already exists; use update() to relabel it", self.manifest_path)
        n = 2
        while f"{base}-{n}".lower() in taken:
            n += 1
        return f"{base}-{n}"

    def _delete_unreferenced(self, manifest: dict[str, Any], rels: list[str]) -> None:
        """Delete labels files that the (already written) manifest no longer names (only inside labels/)."""
        in_use = {r["labels"] for r in manifest["pairs"]}
        in_use |= {v["labels"] for r in manifest["pairs"] for v in r["history"]}
        paths = [self._inside(rel, LABELS_DIR) for rel in rels if rel not in in_use]
        _remove_quietly([p for p in paths if p is not None])

    def _record(self, rec: dict[str, Any]) -> PairRecord:
        return PairRecord(
            id=rec["id"],
            image_path=self.root / rec["image"],
            labels_path=self.root / rec["labels"],
            image_sha256=rec["image_sha256"],
            labels_sha256=rec["labels_sha256"],
            shape=(int(rec["shape"][0]), int(rec["shape"][1])),
            classes=tuple(int(c) for c in rec["classes"]),
            origin=rec["origin"],
            model_version=rec["model_version"],
            created=rec["created"],
            updated=rec["updated"],
            split=rec["split"],
            history_length=len(rec["history"]),
            problem=self._bad_pairs.get(rec["id"]),
        )

    def _version(self, v: dict[str, Any]) -> LabelVersion:
        return LabelVersion(
            labels_path=self.root / v["labels"],
            labels_sha256=v["labels_sha256"],
            classes=tuple(int(c) for c in v["classes"]),
            origin=v["origin"],
            model_version=v["model_version"],
            time=v["time"],
        )

    def _bad_path(self, rec: PairRecord) -> Path:
        for p in self._problems:
            if p.pair_id == rec.id and p.kind != "orphan":
                return p.path
        return rec.labels_path


# --- helpers ---------------------------------------------------------------------------------


def _empty_manifest(history_limit: int | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": {
            "history_limit": DEFAULT_HISTORY_LIMIT if history_limit is None else int(history_limit),
            "validation_fraction": VALIDATION_FRACTION,
        },
        "pairs": [],
    }


def _create_store(root: Path, history_limit: int | None, lock: FileLock) -> None:
    """Make a new store at ``root`` (which has no manifest) whole, or leave nothing behind.

    A new or empty folder is built as a hidden temporary sibling (its folders and manifest) and
    renamed into place in one step, so a full disk or a crash never leaves a store folder without
    a manifest. A folder already holding other files gets the store's folders and manifest in
    place, under the lock; what was made is removed again if that fails. Parent folders made for
    the store are removed on failure too.
    """
    text = json.dumps(_empty_manifest(history_limit), indent=1) + "\n"
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
            _fsync_folder(root.parent)
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


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
            _remove_quietly([root / MANIFEST, root / LOCK_FILE])
        root.rmdir()
    except (OSError, UnicodeDecodeError, FineMaskError):
        return False
    return True


def _current_version(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "labels": entry["labels"],
        "labels_sha256": entry["labels_sha256"],
        "labels_bytes": entry["labels_bytes"],
        "classes": entry["classes"],
        "origin": entry["origin"],
        "model_version": entry["model_version"],
        "time": entry["updated"],
    }


def _labels_name(pair_id: str, version: int) -> str:
    return f"{LABELS_DIR}/{pair_id}.v{version:03d}.tif"


def _check_origin(origin: str) -> None:
    if origin not in ORIGINS:
        raise FineMaskError(f"unknown labels origin {origin!r} (use one of {', '.join(ORIGINS)})")


def _safe_id(name: str) -> str:
    """A file-safe id: letters, digits, '.', '_', '-'; at most 80 characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:80]
    return safe or "pair"


def _image_shape(normalised: np.ndarray) -> tuple[int, int]:
    return int(normalised.shape[0]), int(normalised.shape[1])


def _image_array_to_store(image: Any) -> np.ndarray:
    """The array to write for an in-memory image: channels last, a single channel squeezed."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # same channel-first rule as engine.io.image_from_array
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., 0]  # gray + alpha: PNG cannot hold it as is and readers drop alpha anyway
    return np.ascontiguousarray(arr)


def _prepare_labels(labels: Any, shape: tuple[int, int], image_file: Path, what: str) -> np.ndarray:
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


def _labels_source(labels: Any, fallback: Path) -> Path:
    """The file to name in errors about labels: the labels file, else the image."""
    return Path(labels).expanduser() if isinstance(labels, (str, Path)) else fallback


def _classes_present(labels: np.ndarray) -> list[int]:
    counts = np.bincount(labels.ravel(), minlength=1)
    return [int(c) for c in np.flatnonzero(counts)]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(source: Path, dest: Path) -> str:
    """Copy a file atomically to ``dest``; return the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise FineMaskError(f"cannot read the image file ({exc.strerror})", source) from None
    with src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _remove_quietly(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
