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
(``engine.store.manifest``: one error naming ``manifest.json`` and the field). A path it names
must lie, symlinks resolved, inside the store's ``images/`` or ``labels/`` folder; otherwise the
pair is reported as an ``"outside"`` problem and the store never reads, changes or deletes it.

Concurrency. Every change takes the store's lock file, re-reads the manifest under it, changes
it and writes it back, so two processes (say the napari plugin and the web app) never lose each
other's updates. Readers need no lock: they only ever see a whole manifest.

Splits. Each pair gets a split when it is added and keeps it forever (see :func:`assign_split`):
about one pair in five goes to validation, chosen by image hash, and never more than that share.
"""
from __future__ import annotations

from .creation import discard_new_store
from .files import IMAGES_DIR, LABELS_DIR, LOCK_FILE, MANIFEST
from .inputs import UNLABELLED, check_class_ids
from .manifest import VALIDATION_FRACTION
from .records import LabelVersion, PairRecord, StoreProblem
from .splits import MIN_PAIRS_FOR_VALIDATION, assign_split, split_score
from .store import Store

__all__ = ["IMAGES_DIR", "LABELS_DIR", "LOCK_FILE", "MANIFEST", "MIN_PAIRS_FOR_VALIDATION", "UNLABELLED",
           "VALIDATION_FRACTION", "LabelVersion", "PairRecord", "Store", "StoreProblem", "assign_split",
           "check_class_ids", "discard_new_store", "split_score"]
