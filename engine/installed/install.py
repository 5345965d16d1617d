"""Installing a local file or folder, converting a verified file into place, and removing a model.

Nothing half-done is ever left in the models folder: a file is converted in a hidden temporary
folder inside it and renamed into place in one step.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..checkpoints import CARD_FILE, WEIGHTS_FILE
from ..errors import FineMaskError
from ..hashing import file_hashes
from .folders import (
    ENCODER_INFO,
    ENCODER_WEIGHTS,
    NAME_PATTERN,
    OFFICIAL_REFINER,
    list_installed,
    models_dir,
    shipped_models,
)
from .registry import REGISTRY
from .weights import detect_kind, encoder_state, load_state_dict


def add(path: str | Path, name: str | None = None) -> Path:
    """Install a local file or folder; return the installed folder.

    Accepted: the official CascadePSP weights (the release's ``model`` file, or any ``.pth`` of
    that layout; converted to a FineMask model folder), a torchvision ResNet-18/34/50 state dict
    (kept as encoder weights), or a FineMask model folder (copied). A name of the download
    registry is given only to the file the registry names (its checksums must match).
    """
    src = Path(path).expanduser()
    if src.is_dir():
        return _add_folder(src, name)
    if not src.is_file():
        raise FineMaskError("no such file or folder", src)
    raw = load_state_dict(src)
    kind, arch = detect_kind(raw, src)
    if name is None:
        name = OFFICIAL_REFINER if kind == "refinement" else f"{arch}-imagenet"
    entry = REGISTRY.get(name)
    hashes = file_hashes(src)
    if entry is not None:
        if entry.architecture != arch:
            raise FineMaskError(f"{name!r} is the name of the {entry.description}; this file is a {arch} "
                                f"model: choose another name with --name", src)
        for algo, want in (("md5", entry.md5), ("sha256", entry.sha256)):
            if want and not hashes[algo].startswith(want.lower()):
                raise FineMaskError(f"not the file {entry.url} ({algo.upper()} {hashes[algo]}, expected {want}); "
                                    f"install it under another name with --name", src)
    if kind != "encoder":
        del raw  # the converter reads the file itself
        raw = None
    check_new_name(name)
    with work_dir() as work:
        source = entry.description if entry is not None else f"added by hand from {src.name}"
        install_file(src, name, kind, work, source=source, url=entry.url if entry else None, hashes=hashes,
                      state=raw)
    return models_dir() / name


def _add_folder(src: Path, name: str | None) -> Path:
    from ..checkpoints import read_card, resolve

    card = read_card(resolve(src))
    if name is None:
        name = card.name if NAME_PATTERN.match(card.name or "") else src.resolve().name
    if name in REGISTRY:
        raise FineMaskError(f"{name!r} is reserved for the {REGISTRY[name].description}; choose another name "
                            "with --name", src)
    check_new_name(name)
    with work_dir() as work:
        staging = work / "staging"
        staging.mkdir()
        for file in (CARD_FILE, WEIGHTS_FILE):  # only what a model folder is: no stray files
            shutil.copy2(src / file, staging / file)
        _move_into_place(staging, name)
    return models_dir() / name


def remove(name: str) -> None:
    """Remove installed model ``name`` (shipped models cannot be removed)."""
    if name in shipped_models():
        raise FineMaskError(f"{name!r} is shipped with FineMask and cannot be removed "
                            f"(installed models: {', '.join(m.name for m in list_installed()) or 'none'})")
    folder = models_dir() / name
    if not NAME_PATTERN.match(name) or not folder.is_dir():
        raise FineMaskError(f"no installed model {name!r} (installed: "
                            f"{', '.join(m.name for m in list_installed()) or 'none'})")
    # Rename first, so the name disappears at once and a crash mid-delete leaves only a hidden folder.
    trash = folder.with_name(f".removing-{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def install_file(file: Path, name: str, kind: str, work: Path, *, source: str, url: str | None,
                  hashes: Mapping[str, str], state: Mapping[str, Any] | None = None,
                  architecture: str | None = None) -> None:
    """Convert ``file`` and rename the result into ``models_dir()/name`` (one atomic step).

    ``architecture``: what the file must be (a registry entry's), else whatever it is.
    """
    provenance = {"source": source, "file": file.name, "md5": hashes["md5"], "sha256": hashes["sha256"]}
    if url:
        provenance["url"] = url
    if kind == "refinement":
        from ..checkpoints import save_checkpoint
        from ..refine import Refiner

        try:
            refiner = Refiner.from_official_checkpoint(file, name=name, device="cpu", precision="float32")
        except FineMaskError as exc:
            raise FineMaskError(f"not a usable official CascadePSP checkpoint ({exc.problem}); nothing was "
                                "installed", url or file) from None
        # The SHA-256 is recorded on first install (trust on first use when none is published).
        refiner.card.training = {**refiner.card.training, **provenance}
        staging = work / "staging"
        save_checkpoint(staging, refiner.model.state_dict(), refiner.card)
    else:
        staging = work / "staging"
        try:
            raw = state if state is not None else load_state_dict(file)
            _write_encoder(raw, file, staging, name, provenance, architecture)
        except FineMaskError as exc:
            raise FineMaskError(f"not usable ResNet encoder weights ({exc.problem}); nothing was installed",
                                url or file) from None
    _move_into_place(staging, name)


def _write_encoder(raw: Mapping[str, Any], file: Path, staging: Path, name: str,
                   provenance: Mapping[str, str], architecture: str | None = None) -> None:
    """Check a torchvision ResNet state dict against our encoder, then keep the file unchanged."""
    kind, arch = detect_kind(raw, file)
    if kind != "encoder" or (architecture is not None and arch != architecture):
        raise FineMaskError(f"a {arch} state dict, not {architecture or 'a ResNet'}", file)
    encoder_state(raw, int(arch[len("resnet"):]), file)
    staging.mkdir()
    shutil.copyfile(file, staging / ENCODER_WEIGHTS)
    info = {"name": name, "kind": "encoder", "architecture": arch,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance}
    (staging / ENCODER_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")


def _move_into_place(staging: Path, name: str) -> None:
    """Rename a finished folder to its name (same file system: all or nothing)."""
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    target = models_dir() / name
    if target.exists():
        raise FineMaskError(f"a model called {name!r} was installed meanwhile; nothing was changed", target)
    os.rename(staging, target)


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A hidden temporary folder inside the models folder, removed whatever happens."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_new_name(name: str) -> None:
    """Refuse a name that is malformed, shipped or already installed."""
    if not NAME_PATTERN.match(name):
        raise FineMaskError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (64 at most), "
                            "starting with a letter or digit")
    if name in shipped_models():
        raise FineMaskError(f"{name!r} is the name of a shipped model; choose another name with --name")
    if (models_dir() / name).exists():
        raise FineMaskError(f"a model called {name!r} is already installed; remove it first "
                            f"(`finemask models remove {name}`)")
