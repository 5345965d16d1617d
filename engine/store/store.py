"""The annotation store: :class:`Store` opens, reads and changes one store folder (see ``engine.store``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import FineMaskError
from ..filelock import FileLock
from ..io import image_from_array, read_image, read_labels, write_image, write_labels
from .creation import create_store
from .files import (
    IMAGES_DIR,
    LABELS_DIR,
    LOCK_FILE,
    MANIFEST,
    copy_hashing,
    labels_name,
    remove_quietly,
)
from .inputs import (
    check_class_ids,
    check_origin,
    classes_present,
    image_array_to_store,
    image_shape,
    labels_source,
    prepare_labels,
    safe_id,
)
from .integrity import FileHashes, check_files, inside, refuse_outside
from .manifest import SPLITS, parse_manifest
from .records import (
    LabelVersion,
    PairRecord,
    StoreProblem,
    history_entry,
    label_version,
    now_iso,
    pair_record,
)
from .splits import assign_split


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
        self._hash = FileHashes()
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
    ) -> Store:
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
            create_store(root, history_limit, store._lock)
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
            self._pair_record(r)
            for r in self._manifest["pairs"]
            if r["id"] not in self._bad_pairs and (split is None or r["split"] == split)
        ]

    def get(self, pair_id: str) -> PairRecord:
        """The record of one pair (also of an unusable one: see ``problem``)."""
        self._refresh()
        return self._pair_record(self._find(self._manifest, pair_id))

    def history(self, pair_id: str) -> list[LabelVersion]:
        """Previous labels versions of a pair, newest first (the current one not included)."""
        self._refresh()
        rec = self._find(self._manifest, pair_id)
        return [label_version(self.root, v) for v in rec["history"]]

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
        check_origin(origin)
        if isinstance(image, (str, Path)):
            source: Path | None = Path(image).expanduser()
            shape = image_shape(read_image(source))
            suffix = ".jpg" if source.suffix.lower() == ".jpeg" else source.suffix.lower()
            array = None
        else:
            source = None
            array = image_array_to_store(image)
            shape = image_shape(image_from_array(array))
            suffix = ".png" if array.dtype == np.uint8 else ".tif"
        label_array = prepare_labels(labels, shape, source if source is not None else self.root, what="new pair")
        classes = classes_present(label_array)
        base = safe_id(name if name is not None else (source.stem if source is not None else "pair"))

        with self._locked():
            manifest = self._read_manifest()
            check_class_ids(classes, manifest["settings"].get("class_names"),
                            labels_source(labels, source if source is not None else self.root))
            pair_id = self._new_id(manifest, base, must_be_new=name is not None)
            image_rel = f"{IMAGES_DIR}/{pair_id}{suffix}"
            labels_rel = labels_name(pair_id, 1)
            written: list[Path] = []
            try:
                image_path = self.root / image_rel
                written.append(image_path)
                if source is not None:
                    image_sha = copy_hashing(source, image_path)
                else:
                    write_image(image_path, array)
                    image_sha = self._hash(image_path)
                labels_path = self.root / labels_rel
                written.append(labels_path)
                write_labels(labels_path, label_array)
                now = now_iso()
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
                remove_quietly(written)
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
        check_origin(origin)
        rec = self.get(pair_id)
        label_array = prepare_labels(labels, rec.shape, rec.image_path, what=f"pair {pair_id!r}")
        classes = classes_present(label_array)
        with self._locked():
            manifest = self._read_manifest()
            entry = self._find(manifest, pair_id)
            refuse_outside(self.root, entry)
            check_class_ids(classes, manifest["settings"].get("class_names"), labels_source(labels, rec.image_path))
            version = entry["next_version"]
            named = {entry["labels"], *(v["labels"] for v in entry["history"])}
            while labels_name(pair_id, version) in named:
                version += 1  # a hand-edited next_version never overwrites a stored version
            labels_rel = labels_name(pair_id, version)
            labels_path = self.root / labels_rel
            try:
                write_labels(labels_path, label_array)
                limit = int(manifest["settings"]["history_limit"])
                history = [history_entry(entry)] + entry["history"]
                dropped = history[limit:]
                entry.update(
                    labels=labels_rel,
                    labels_sha256=self._hash(labels_path),
                    labels_bytes=labels_path.stat().st_size,
                    classes=classes,
                    origin=origin,
                    model_version=model_version,
                    updated=now_iso(),
                    history=history[:limit],
                    next_version=version + 1,
                )
                self._write_manifest(manifest)
            except BaseException:
                remove_quietly([labels_path])
                raise
            self._delete_unreferenced(manifest, [v["labels"] for v in dropped])
        return self.get(pair_id)

    def undo(self, pair_id: str) -> PairRecord:
        """Go back to a pair's previous labels version; the current one is discarded."""
        with self._locked():
            manifest = self._read_manifest()
            entry = self._find(manifest, pair_id)
            refuse_outside(self.root, entry)
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
                updated=now_iso(),
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
            remove_quietly(orphans)
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
        """The manifest, checked field by field (``engine.store.manifest``)."""
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
            self._problems, self._bad_pairs = check_files(self.root, manifest, full, self._hash)
            self._manifest, self._manifest_key = manifest, key

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
        paths = [inside(self.root, rel, LABELS_DIR) for rel in rels if rel not in in_use]
        remove_quietly([p for p in paths if p is not None])

    def _pair_record(self, rec: dict[str, Any]) -> PairRecord:
        return pair_record(self.root, rec, self._bad_pairs.get(rec["id"]))

    def _bad_path(self, rec: PairRecord) -> Path:
        for p in self._problems:
            if p.pair_id == rec.id and p.kind != "orphan":
                return p.path
        return rec.labels_path

