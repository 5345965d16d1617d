"""Planning a batch: the images of a folder, their sizes, and which outputs are already done."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import tifffile

from ..errors import FineMaskError
from ..huge import ZARR_SUFFIX, LazyImage
from ..io import IMAGE_SUFFIXES, image_shape
from .config import LABELS_SUFFIX, Job
from .summary import SUMMARY_FILE


def plan_jobs(input_dir: str | Path, output_dir: str | Path) -> list[Job]:
    """One job per image in ``input_dir`` (TIFF, PNG, JPEG, ``.zarr`` folders; hidden names
    skipped), sorted by name. Inputs sharing a stem would write the same output: all but the
    first get an error."""
    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    if not input_dir.is_dir():
        raise FineMaskError("input folder not found", input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FineMaskError("output path exists and is not a folder", output_dir)
    if output_dir.resolve() == input_dir.resolve():
        raise FineMaskError("output folder must differ from the input folder (outputs would replace inputs)",
                            output_dir)
    sources = sorted(p for p in input_dir.iterdir() if not p.name.startswith(".") and
                     ((p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) or
                      (p.is_dir() and p.suffix.lower() == ZARR_SUFFIX)))
    if not sources:
        raise FineMaskError("folder holds no images (.tif, .png, .jpg, .zarr)", input_dir)
    jobs, seen = [], {}
    for src in sources:
        out = output_dir / f"{src.stem}{LABELS_SUFFIX}"
        first = seen.setdefault(out.name, src.name)
        error = "" if first == src.name else f"{src}: same name as {first}; both would write {out.name}"
        jobs.append(Job(src, out, error))
    return jobs


def source_shape(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an input from its header (TIFF/PNG/JPEG) or metadata (zarr)."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        with LazyImage(path, max_pixels=max_pixels) as img:
            return img.height, img.width
    return image_shape(path, max_pixels=max_pixels)


def output_done(path: str | Path, shape: tuple[int, int]) -> bool:
    """Whether ``path`` is a finished labels file for an image of ``shape``: one page of
    uint8/uint16, the right size, every data segment inside the file, and (up to 16 Mpx) decodable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) != 1:
                return False
            page = tif.pages[0]
            if page.dtype not in (np.uint8, np.uint16) or tuple(page.shape) != tuple(shape):
                return False
            if any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
                return False
            if shape[0] * shape[1] <= 1 << 24:
                page.asarray()
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is "not done"
        return False


def remove_stray_temporaries(output_dir: Path, jobs: list[Job]) -> None:
    """Remove temporary files of interrupted atomic writes (``engine.atomic`` names them
    ``.<stem>.<random>.tmp<suffix>``) left by workers killed mid-write."""
    stems = {j.output.stem for j in jobs} | {Path(SUMMARY_FILE).stem}
    for p in output_dir.glob(".*.tmp*"):
        stem = p.name[1:].rsplit(".tmp", 1)[0].rsplit(".", 1)[0]
        if stem in stems and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
