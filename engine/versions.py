"""Fine-tuned model versions of an annotation store: ``<store>/models/<name>/`` checkpoint folders.

Only listing lives here (no torch training code), so front ends can offer the versions without
importing ``training``; ``training.finetune`` writes them.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoints import ModelCard, read_card, resolve
from .errors import FineMaskError
from .store import Store

#: Sub-folder of a store holding its fine-tuned versions.
MODELS_DIR = "models"


def models_dir(store: Store | str | Path) -> Path:
    """The folder holding a store's fine-tuned model versions (``<store>/models``)."""
    root = store.root if isinstance(store, Store) else Path(store).expanduser()
    return root / MODELS_DIR


def list_versions(store: Store | str | Path) -> list[tuple[str, Path, ModelCard]]:
    """Fine-tuned versions in the store's models folder as (name, folder, card), oldest first.

    Folders that are not readable model folders (say, half-copied by hand) and hidden ones (a
    run's state, a version being written) are skipped.
    """
    folder = models_dir(store)
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            card = read_card(resolve(path))
        except FineMaskError:
            continue
        found.append((path.name, path, card))
    return sorted(found, key=lambda v: (str(v[2].training.get("created", "")), v[0]))


__all__ = ["MODELS_DIR", "list_versions", "models_dir"]
