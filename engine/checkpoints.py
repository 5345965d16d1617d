"""Model checkpoints: a folder holding ``model.safetensors`` and a JSON ``card.json``.

Loading never unpickles. A checkpoint folder is written under a temporary name and renamed into
place, so a crash leaves either no new model or a whole one. Shipped models live in
``assets/models/<name>/`` and are addressed by ``<name>``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .assets import MODELS_DIR
from .errors import FineMaskError

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
FORMAT_VERSION = 1
#: The architectures each task's loader builds (a card naming another is refused on reading).
ARCHITECTURES = {"segmentation": ("dsrl",), "refinement": ("cascadepsp",)}
#: Pickled PyTorch weights: never loaded from a model folder (unpickling can run code).
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
_CONVERT_HINT = (
    "FineMask loads only model.safetensors + card.json, never pickled weights; convert the official CascadePSP "
    "weights with Refiner.from_official_checkpoint(path, save_to=folder) (or `finemask refine --model <file>`)"
)
ASSETS_MODELS = MODELS_DIR


@dataclass
class ModelCard:
    """What a checkpoint is: enough to rebuild the model and to tell a user where it came from.

    ``task`` is ``"segmentation"`` or ``"refinement"``; ``architecture`` names the builder
    (``"dsrl"``, ``"cascadepsp"``); ``config`` holds the builder's dataclass fields;
    ``input_size`` is the working size (width, height) the model was trained for.
    """

    name: str
    task: str
    architecture: str
    config: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    input_size: list[int] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> ModelCard:
        """A card from its JSON object, checked field by field (FineMaskError naming ``path``)."""
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("name", "task", "architecture", "config") if k not in data]
        if missing:
            raise FineMaskError(f"model card lacks the field(s) {', '.join(missing)}", path)
        card = cls(**{k: v for k, v in data.items() if k in known})
        problem = card.problem()
        if problem:
            raise FineMaskError(f"model card is invalid: {problem}", path)
        return card

    def problem(self) -> str | None:
        """What is wrong with the card's fields (types, ranges, task and architecture), or None."""
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        types = {"name": str, "task": str, "architecture": str, "config": dict, "classes": list, "palette": list,
                 "metrics": dict, "training": dict, "created": str}
        for key, kind in types.items():
            if not isinstance(getattr(self, key), kind):
                return f"{key} must be a {kind.__name__}, found {type(getattr(self, key)).__name__}"
        if self.parent is not None and not isinstance(self.parent, str):
            return f"parent must be a name or null, found {type(self.parent).__name__}"
        if not is_int(self.format_version) or self.format_version > FORMAT_VERSION:
            return f"format_version {self.format_version!r} is not one this FineMask reads (up to {FORMAT_VERSION})"
        known = ARCHITECTURES.get(self.task)
        if known is None:
            return f"unknown task {self.task!r} (FineMask models do {' or '.join(ARCHITECTURES)})"
        if self.architecture not in known:
            return (f"architecture {self.architecture!r} is not a {self.task} architecture "
                    f"(FineMask builds {', '.join(known)})")
        if not all(isinstance(c, str) for c in self.classes):
            return "classes must be a list of names"
        if not all(isinstance(c, list) and len(c) == 3 and all(is_int(v) and 0 <= v <= 255 for v in c)
                   for c in self.palette):
            return "palette must be a list of [r, g, b] colours (0..255)"
        if self.input_size is not None and not (
            isinstance(self.input_size, list) and len(self.input_size) == 2
            and all(is_int(v) and v > 0 for v in self.input_size)
        ):
            return f"input_size must be [width, height] in pixels, found {self.input_size!r}"
        n = self.config.get("num_classes")
        if self.classes and is_int(n) and len(self.classes) != n:
            return f"{len(self.classes)} class names for a model of {n} classes (config num_classes)"
        return None


def shipped_models() -> list[str]:
    """Names of the shipped models in ``assets/models``."""
    if not ASSETS_MODELS.is_dir():
        return []
    return sorted(p.name for p in ASSETS_MODELS.iterdir() if (p / CARD_FILE).is_file())


def available_models() -> list[str]:
    """Names of the shipped models, then of the user's installed ones (``engine.installed``)."""
    from .installed import list_installed

    shipped = shipped_models()
    return shipped + [m.name for m in list_installed() if m.kind != "encoder" and m.name not in shipped]


def resolve(name_or_path: str | Path) -> Path:
    """Return the checkpoint folder for a shipped or installed model name, a folder, or a file inside one."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, CARD_FILE):
        path = path.parent
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise FineMaskError(f"a pickled PyTorch weights file, not a FineMask model folder. {_CONVERT_HINT}", path)
    if path.is_dir():
        if not (path / CARD_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = f" It holds {', '.join(pickles)}: {_CONVERT_HINT}" if pickles else ""
            raise FineMaskError(f"not a FineMask model folder (needs {WEIGHTS_FILE} and {CARD_FILE}).{hint}", path)
        return path
    shipped = ASSETS_MODELS / str(name_or_path)
    if "/" not in str(name_or_path) and (shipped / CARD_FILE).is_file():
        return shipped
    from .installed import installed_folder

    installed = installed_folder(str(name_or_path))
    if installed is not None:
        return installed
    names = ", ".join(available_models()) or "none"
    raise FineMaskError(f"no such model (shipped and installed models: {names}; "
                        "`finemask models list` shows what can be downloaded)", path)


def is_shipped(folder: str | Path) -> bool:
    """Whether ``folder`` is (inside) the shipped models folder ``assets/models``."""
    try:
        return Path(folder).resolve().is_relative_to(ASSETS_MODELS.resolve())
    except OSError:
        return False


def read_card(name_or_path: str | Path) -> ModelCard:
    """Read only the card of a checkpoint."""
    folder = resolve(name_or_path)
    card_path = folder / CARD_FILE
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FineMaskError(f"model card is not readable JSON ({exc})", card_path) from None
    if not isinstance(data, dict):
        raise FineMaskError("model card is not a JSON object", card_path)
    return ModelCard.from_dict(data, card_path)


def record_metrics(name_or_path: str | Path, key: str, metrics: Any, *, merge: bool = False) -> ModelCard:
    """Store ``metrics`` (JSON-able) under ``card.metrics[key]``; the card is rewritten atomically.

    With ``merge``, a dict of metrics updates the one stored under ``key`` instead of replacing it
    (so scores recorded per test set, one set at a time, accumulate). A shipped model (under
    ``assets/models``) is refused: its card belongs to the installed package.
    """
    from .atomic import atomic_write_text

    folder = resolve(name_or_path)
    if is_shipped(folder):
        raise FineMaskError("this model is shipped with FineMask (assets/models); its card is part of the installed "
                            "package and is never written. Copy the folder elsewhere and record the scores there",
                            folder)
    card = read_card(folder)
    new = json.loads(json.dumps(metrics))
    old = card.metrics.get(key)
    if merge and isinstance(old, dict) and isinstance(new, dict):
        new = {**old, **new}
    card.metrics = {**card.metrics, key: new}
    atomic_write_text(folder / CARD_FILE, card.to_json())
    return card


def read_pickled_state_dict(path: str | Path, *, strip_module: bool = True) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a foreign PyTorch weights file (the official CascadePSP file, a
    torchvision ResNet), read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and containers. A ``{"state_dict": ...}`` wrapper is removed, and with
    ``strip_module`` the ``module.`` prefixes of DataParallel. FineMaskError naming the file when it
    cannot be read or holds no tensors."""
    path = Path(path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise FineMaskError(f"not a loadable PyTorch weights file ({type(exc).__name__}: {exc})", path) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise FineMaskError("file does not hold a state dict of tensors", path)
    return {k.removeprefix("module."): v for k, v in raw.items()} if strip_module else dict(raw)


def load_checkpoint(name_or_path: str | Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Load tensors (as float32 where stored as half) and the card; never unpickles."""
    folder = resolve(name_or_path)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FineMaskError(f"weights file is not readable safetensors ({exc})", weights) from None
    state = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in state.items()}
    return state, card


def save_checkpoint(
    folder: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    card: ModelCard,
    *,
    half: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/card.json`` atomically as one folder.

    ``half`` stores floating tensors as float16 (they load back as float32).
    An existing folder is replaced only with ``overwrite=True``.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FineMaskError("a model already exists here; choose a new name", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not card.created:
        card.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes the folder private; a model folder is an ordinary one
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return folder
