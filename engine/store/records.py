"""What a store reports: pairs, their labels versions and the files it cannot use."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


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


def pair_record(root: Path, rec: dict[str, Any], problem: str | None) -> PairRecord:
    """The :class:`PairRecord` of a (checked) manifest entry of the store at ``root``."""
    return PairRecord(
        id=rec["id"],
        image_path=root / rec["image"],
        labels_path=root / rec["labels"],
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
        problem=problem,
    )


def label_version(root: Path, v: dict[str, Any]) -> LabelVersion:
    """The :class:`LabelVersion` of a history entry of the store at ``root``."""
    return LabelVersion(
        labels_path=root / v["labels"],
        labels_sha256=v["labels_sha256"],
        classes=tuple(int(c) for c in v["classes"]),
        origin=v["origin"],
        model_version=v["model_version"],
        time=v["time"],
    )


def history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The history entry that keeps a manifest entry's current labels version."""
    return {
        "labels": entry["labels"],
        "labels_sha256": entry["labels_sha256"],
        "labels_bytes": entry["labels_bytes"],
        "classes": entry["classes"],
        "origin": entry["origin"],
        "model_version": entry["model_version"],
        "time": entry["updated"],
    }


def now_iso() -> str:
    """The time now as the manifest writes it (ISO 8601, UTC, milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
