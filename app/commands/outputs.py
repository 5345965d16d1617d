"""Output paths checked before a command does any work (before a model loads).

An output that is one of the inputs, a folder where a file is wanted, a file where a folder is
wanted, or a path under a file or an unwritable folder is one FineMaskError naming the output.
Images of one folder whose names differ only in their suffix (``a.png``, ``a.jpg``) get distinct
output names instead of overwriting each other's result.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from engine.errors import FineMaskError

LABEL_OUTPUT_SUFFIXES = (".tif", ".tiff", ".png")


def check_output_file(output: Path, inputs: Iterable[Path] = (),
                      suffixes: Sequence[str] = LABEL_OUTPUT_SUFFIXES) -> Path:
    """``output`` if a result can be written there without replacing an input; else a FineMaskError."""
    output = Path(output).expanduser()
    if output.is_dir():
        raise FineMaskError("output is an existing folder; give a file name"
                            + (f" ending in {_either(suffixes)}" if suffixes else ""), output)
    if suffixes and output.suffix.lower() not in suffixes:
        raise FineMaskError(f"output must end in {_either(suffixes)}", output)
    for source in inputs:
        if same_path(output, source):
            raise FineMaskError(f"output is the input {source}: writing it would replace the input; "
                                "choose another output name", output)
    _check_writable_folder(output.parent, output)
    return output


def check_output_folder(folder: Path, inputs: Iterable[Path] = ()) -> Path:
    """``folder`` if outputs can be written into it (made if missing) and it is none of ``inputs``
    (an input folder or file); else a FineMaskError."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FineMaskError("output must be a folder, but it is a file", folder)
    for source in inputs:
        if same_path(folder, source):
            raise FineMaskError("output folder must differ from the input folder (outputs would replace or mix "
                                "with the inputs)", folder)
    _check_writable_folder(folder, folder)
    return folder


def folder_outputs(images: Sequence[Path], folder: Path, suffix: str = ".tif") -> list[Path]:
    """One distinct output path in ``folder`` per image: ``<stem><suffix>``, or, for images whose
    stems are shared (``a.png``, ``a.jpg``; compared ignoring case), ``<stem>_<ext><suffix>``
    (``a_png.tif``, ``a_jpg.tif``), numbered on if that is still taken. Renamed ones are
    reported on stderr. No output may be an input."""
    folder = Path(folder).expanduser()
    stems = Counter(p.stem.lower() for p in images)
    taken: set[str] = set()
    outputs = []
    for image in images:
        name = image.stem if stems[image.stem.lower()] == 1 else f"{image.stem}_{image.suffix.lstrip('.').lower()}"
        candidate, n = name, 1
        while (candidate + suffix).lower() in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add((candidate + suffix).lower())
        outputs.append(folder / f"{candidate}{suffix}")
        if candidate != image.stem:
            print(f"note: {image.name} shares its name with another image: writing {candidate}{suffix}",
                  file=sys.stderr)
    for out in outputs:
        for image in images:
            if same_path(out, image):
                raise FineMaskError(f"output would replace the input {image}; choose another output folder", out)
    return outputs


def same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder (links followed; missing files by
    their resolved paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        except (OSError, RuntimeError):  # a symlink loop: the same only as written
            return Path(a).absolute() == Path(b).absolute()


def _check_writable_folder(folder: Path, output: Path) -> None:
    """The nearest existing folder at or above ``folder`` must be a writable folder (the rest is made)."""
    existing = folder if str(folder) else Path(".")
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if os.path.islink(existing) and not existing.exists():
        raise FineMaskError(f"cannot write the output: {existing} is a broken symbolic link or a symlink loop",
                            output)
    if not existing.is_dir():
        raise FineMaskError(f"cannot write the output: {existing} is a file, not a folder", output)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FineMaskError(f"cannot write the output: no permission to write in {existing}", output)


def _either(suffixes: Sequence[str]) -> str:
    return ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
