"""Where installed models live, and which are there: listing and finding them by name."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints import CARD_FILE, WEIGHTS_FILE
from ..errors import FineMaskError
from .registry import REGISTRY

ENCODER_WEIGHTS = "weights.pth"
ENCODER_INFO = "encoder.json"
SHIPPED_REFINER = "refine-light"
OFFICIAL_REFINER = "cascadepsp"
#: An installed model's name (its folder's name).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class InstalledModel:
    """An installed model: ``kind`` is "refinement", "segmentation" or "encoder"."""

    name: str
    kind: str
    folder: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def models_dir() -> Path:
    """``<user data dir>/finemask/models`` (not created here)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("finemask", appauthor=False)) / "models"


def shipped_models() -> list[str]:
    """Names of the models shipped in ``assets/models``."""
    from ..checkpoints import shipped_models as shipped

    return shipped()


def installed_folder(name: str) -> Path | None:
    """The installed FineMask model folder called ``name`` (card + weights), or None."""
    if not NAME_PATTERN.match(name):
        return None
    folder = models_dir() / name
    return folder if (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file() else None


def list_installed() -> list[InstalledModel]:
    """Installed models, by name; unreadable or half-written folders are left out."""
    from ..checkpoints import read_card

    root = models_dir()
    found: list[InstalledModel] = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not NAME_PATTERN.match(folder.name):
            continue
        if (folder / ENCODER_INFO).is_file() and (folder / ENCODER_WEIGHTS).is_file():
            info = read_json(folder / ENCODER_INFO)
            if info is not None:
                found.append(InstalledModel(folder.name, "encoder", folder, {}, str(info.get("source", ""))))
            continue
        if installed_folder(folder.name) is None:
            continue
        try:
            card = read_card(folder)
        except FineMaskError:
            continue
        found.append(InstalledModel(folder.name, card.task, folder, dict(card.metrics),
                                    str(card.training.get("source", ""))))
    return found


def weights_path(name: str) -> Path:
    """The installed encoder weights file ``name``: a torchvision state dict (``torch.load``-able)."""
    folder = models_dir() / name if NAME_PATTERN.match(name) else None
    if folder is not None and (folder / ENCODER_WEIGHTS).is_file() and (folder / ENCODER_INFO).is_file():
        return folder / ENCODER_WEIGHTS
    how = f"finemask models get {name}" if name in REGISTRY and REGISTRY[name].kind == "encoder" \
        else f"finemask models add FILE --name {name}"
    raise FineMaskError(f"encoder weights {name!r} are not installed; run `{how}`")


def default_refiner() -> str:
    """``"cascadepsp"`` (the official weights) once installed, else the shipped ``"refine-light"``."""
    return OFFICIAL_REFINER if installed_folder(OFFICIAL_REFINER) is not None else SHIPPED_REFINER


def is_installed(folder: Path) -> bool:
    """Whether ``folder`` holds a whole installed model (FineMask model or encoder weights)."""
    return ((folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()) or \
        ((folder / ENCODER_INFO).is_file() and (folder / ENCODER_WEIGHTS).is_file())


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, or None when unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
