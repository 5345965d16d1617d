"""Resumable training state without pickle: tensors in safetensors, structure in JSON.

A training state (model, optimizer, scheduler, step, RNG states) is a nested structure of dicts,
lists, numbers and tensors. :func:`pack` splits it into a flat ``{key: tensor}`` dict and a JSON
skeleton that refers to those keys; :func:`unpack` rebuilds it. Dict keys keep their types (the
optimizer uses integer keys). States are written as a folder, atomically, like model checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import FineMaskError

TENSORS_FILE = "state.safetensors"
SKELETON_FILE = "state.json"


def pack(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into tensors and a JSON-serialisable skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot pack a {type(x).__name__}")

    return tensors, walk(obj)


def unpack(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`pack`."""

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            return {walk(k): walk(v) for k, v in x["__dict__"]}
        return x

    return walk(skeleton)


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write a training state folder atomically, replacing an older one only once complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = pack(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes the folder private; a model folder is an ordinary one
    try:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / SKELETON_FILE).write_text(json.dumps(skeleton), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return folder


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read a training state folder written by :func:`save_state`.

    If a crash happened between moving the old state aside and moving the new one in, the old
    state (``.<name>.old``) is used.
    """
    folder = Path(folder)
    if not folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            folder = old
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
        skeleton = json.loads((folder / SKELETON_FILE).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's problem
        raise FineMaskError(f"training state is missing or unreadable ({exc})", folder) from None
    return unpack(tensors, skeleton)


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) RNG states, to restore with :func:`set_rng_state`."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
