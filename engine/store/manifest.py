"""Reading an annotation store's ``manifest.json``: parsed, then checked field by field.

The manifest may have been edited by hand (or damaged), so nothing in it is trusted: every field
the store uses is checked for its type and range here, and the first problem is raised as one
:class:`FineMaskError` naming ``manifest.json`` and the field (``pairs[3].shape``), never as a
``KeyError`` or ``TypeError`` deep inside the store. Whether the paths it names lie inside the
store is checked by the store itself (those pairs become problems, not errors).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import FineMaskError

FORMAT = "finemask-store"
FORMAT_VERSION = 1
ORIGINS = ("predicted", "refined", "corrected")
SPLITS = ("train", "validation")
DEFAULT_HISTORY_LIMIT = 10
#: Share of pairs whose image hash puts them in validation.
VALIDATION_FRACTION = 0.2
#: Largest label value (labels are uint16).
MAX_LABEL = 65535
#: A pair id is also part of its file names: letters, digits, '.', '_', '-', starting with one of the first two.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = (
    "id", "image", "image_sha256", "image_bytes", "labels", "labels_sha256", "labels_bytes", "shape",
    "classes", "origin", "model_version", "created", "updated", "split", "history", "next_version",
)
_VERSION_KEYS = ("labels", "labels_sha256", "classes", "origin", "model_version", "time")


class _Invalid(Exception):
    """A field is wrong: ``field`` is its place (``settings.history_limit``), ``problem`` what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def parse_manifest(text: str, path: Path) -> dict[str, Any]:
    """The checked manifest from its JSON text; one FineMaskError naming ``path`` (and the field) if bad.

    A missing ``settings`` object, or missing settings in it, get their defaults.
    """
    try:
        data = json.loads(text)
    except RecursionError:
        raise FineMaskError("store manifest is not readable JSON (nested too deeply)", path) from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise FineMaskError(f"store manifest is not readable JSON ({_one_line(exc)})", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FineMaskError(f"not a FineMask store manifest (no \"format\": \"{FORMAT}\")", path)
    try:
        _check(data)
    except _Invalid as bad:
        raise FineMaskError(f"store manifest field {bad.field} {bad.problem}", path) from None
    return data


def _check(data: dict[str, Any]) -> None:
    version = data.get("format_version")
    if not _is_int(version) or version < 1:
        raise _Invalid("format_version", f"must be a whole number >= 1, found {_shown(version)}")
    if version > FORMAT_VERSION:
        raise _Invalid("format_version", f"is {version}: the store was written by a newer FineMask; please upgrade")
    settings = data.setdefault("settings", {})
    if not isinstance(settings, dict):
        raise _Invalid("settings", f"must be an object, found {_shown(settings)}")
    limit = settings.setdefault("history_limit", DEFAULT_HISTORY_LIMIT)
    if not _is_int(limit) or limit < 0:
        raise _Invalid("settings.history_limit", f"must be a whole number >= 0, found {_shown(limit)}")
    fraction = settings.setdefault("validation_fraction", VALIDATION_FRACTION)
    if not _is_number(fraction) or not 0.0 <= fraction <= 1.0:
        raise _Invalid("settings.validation_fraction", f"must be a number from 0 to 1, found {_shown(fraction)}")
    names = settings.get("class_names")
    if names is not None and not (
        isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)
    ):
        raise _Invalid("settings.class_names", f"must be null or a list of non-empty names, found {_shown(names)}")
    pairs = data.get("pairs")
    if not isinstance(pairs, list):
        raise _Invalid("pairs", f"must be a list, found {_shown(pairs)}")
    seen: set[str] = set()
    for i, rec in enumerate(pairs):
        _check_pair(rec, f"pairs[{i}]")
        if rec["id"] in seen:
            raise _Invalid(f"pairs[{i}].id", f"repeats the id {rec['id']!r} of an earlier pair")
        seen.add(rec["id"])


def _check_pair(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise _Invalid(where, f"must be an object, found {_shown(rec)}")
    missing = [k for k in _RECORD_KEYS if k not in rec]
    if missing:
        raise _Invalid(where, f"lacks the key(s) {', '.join(missing)}")
    if not isinstance(rec["id"], str) or not ID_PATTERN.fullmatch(rec["id"]):
        raise _Invalid(f"{where}.id", f"must be a file-safe name (letters, digits, . _ -), found {_shown(rec['id'])}")
    try:
        _check_pair_fields(rec, where)
    except _Invalid as bad:
        raise _Invalid(f"{bad.field} (pair {rec['id']!r})", bad.problem) from None


def _check_pair_fields(rec: dict[str, Any], where: str) -> None:
    where = f"{where}.{{}}"
    for key in ("image", "labels"):
        _path(rec[key], where.format(key))
    for key in ("image_sha256", "labels_sha256"):
        _sha(rec[key], where.format(key))
    _size(rec["image_bytes"], where.format("image_bytes"), nullable=False)
    _size(rec["labels_bytes"], where.format("labels_bytes"), nullable=True)
    shape = rec["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise _Invalid(where.format("shape"), f"must be [height, width] in pixels, found {_shown(shape)}")
    _classes(rec["classes"], where.format("classes"))
    _choice(rec["origin"], ORIGINS, where.format("origin"))
    _choice(rec["split"], SPLITS, where.format("split"))
    _optional_text(rec["model_version"], where.format("model_version"))
    for key in ("created", "updated"):
        if not isinstance(rec[key], str):
            raise _Invalid(where.format(key), f"must be a time stamp (text), found {_shown(rec[key])}")
    nxt = rec["next_version"]
    if not _is_int(nxt) or not 1 <= nxt < 10**9:
        raise _Invalid(where.format("next_version"), f"must be a whole number >= 1, found {_shown(nxt)}")
    history = rec["history"]
    if not isinstance(history, list):
        raise _Invalid(where.format("history"), f"must be a list of earlier labels versions, found {_shown(history)}")
    for j, version in enumerate(history):
        at = where.format(f"history[{j}]")
        if not isinstance(version, dict):
            raise _Invalid(at, f"must be an object, found {_shown(version)}")
        missing = [k for k in _VERSION_KEYS if k not in version]
        if missing:
            raise _Invalid(at, f"lacks the key(s) {', '.join(missing)}")
        _path(version["labels"], f"{at}.labels")
        _sha(version["labels_sha256"], f"{at}.labels_sha256")
        _size(version.get("labels_bytes"), f"{at}.labels_bytes", nullable=True)
        _classes(version["classes"], f"{at}.classes")
        _choice(version["origin"], ORIGINS, f"{at}.origin")
        _optional_text(version["model_version"], f"{at}.model_version")
        if not isinstance(version["time"], str):
            raise _Invalid(f"{at}.time", f"must be a time stamp (text), found {_shown(version['time'])}")


def _path(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(where, f"must be a path inside the store, found {_shown(value)}")


def _sha(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _Invalid(where, f"must be a SHA-256 (64 lower-case hex digits), found {_shown(value)}")


def _size(value: Any, where: str, nullable: bool) -> None:
    if value is None and nullable:
        return
    if not _is_int(value) or value < 0:
        raise _Invalid(where, f"must be a size in bytes (a whole number >= 0), found {_shown(value)}")


def _classes(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(_is_int(c) and 0 <= c <= MAX_LABEL for c in value):
        raise _Invalid(where, f"must be a list of class ids (0..{MAX_LABEL}), found {_shown(value)}")


def _choice(value: Any, choices: tuple[str, ...], where: str) -> None:
    if value not in choices or not isinstance(value, str):
        raise _Invalid(where, f"must be one of {', '.join(choices)}, found {_shown(value)}")


def _optional_text(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise _Invalid(where, f"must be text or null, found {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _shown(value: Any, limit: int = 40) -> str:
    """A short one-line JSON rendering of a found value (``null``, ``[]``, ``"abc"``)."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):  # pragma: no cover - the value came from JSON
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


__all__ = ["DEFAULT_HISTORY_LIMIT", "FORMAT", "FORMAT_VERSION", "ID_PATTERN", "ORIGINS", "SPLITS",
           "VALIDATION_FRACTION", "parse_manifest"]
