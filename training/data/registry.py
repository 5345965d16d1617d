"""The datasets FineMask trains on, by name: ``load_dataset("camvid", "train", root=...)``.

``root`` is the dataset's own folder (e.g. ``.../data/camvid``); by default it is
``$FINEMASK_DATA/<name>``, else ``<repo>/../shared/data/<name>``. Splits are fixed and
deterministic:

- camvid: ``train`` / ``val`` from ``train.txt`` / ``val.txt`` (367 / 101 pairs).
- dubai: ``val`` = part 009 of each of the 7 tiles (7 images), ``train`` = the other 56.
- idrid: ``val`` = IDRiD_45..54 (held out for the 4K refinement evaluation), ``train`` = 01..44.
- isbi2012: ``val`` = slices 25..29, ``train`` = 0..24.

Every dataset also has ``all``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.errors import FineMaskError
from engine.io import read_image

from .readers import FolderDataset, ListFileDataset, MaskFolderDataset, SegmentationDataset

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip
#: SegNet's CamVid colours, as in ``palette11.png`` (used when that file is absent)
CAMVID_PALETTE = [
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
]  # fmt: skip
CAMVID_VOID = 11

DUBAI_CLASSES = ["unlabeled", "building", "land", "road", "vegetation", "water"]
#: colours of the original "Semantic segmentation of aerial imagery" (Dubai) release
DUBAI_PALETTE = [
    [155, 155, 155],
    [60, 16, 152],
    [132, 41, 246],
    [110, 193, 228],
    [254, 221, 58],
    [226, 169, 41],
]
DUBAI_VAL_PART = "009"

IDRID_CLASSES = ["microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates", "optic_disc"]
#: overlap rule of the index map: small lesions over large ones, every lesion over the optic disc
#: (overlaps are rare: about 6 thousand pixels in all 54 images, mostly haemorrhage/optic disc)
IDRID_PRECEDENCE = IDRID_CLASSES
IDRID_PALETTE = [[0, 0, 0], [255, 0, 0], [0, 200, 0], [255, 255, 0], [0, 255, 255], [0, 0, 255]]
IDRID_VAL = range(45, 55)

ISBI_CLASSES = ["membrane", "cell"]
ISBI_VAL = range(25, 30)

SPLITS = {
    "camvid": ("train", "val", "all"),
    "dubai": ("train", "val", "all"),
    "idrid": ("train", "val", "all"),
    "isbi2012": ("train", "val", "all"),
}


def data_root() -> Path:
    """Folder holding the datasets: ``$FINEMASK_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("FINEMASK_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> SegmentationDataset:
    """A dataset by name (``camvid``, ``dubai``, ``idrid``, ``isbi2012``) and split."""
    if name not in _LOADERS:
        raise FineMaskError(f"unknown dataset {name!r}; known: {', '.join(_LOADERS)}")
    if split not in SPLITS[name]:
        raise FineMaskError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(SPLITS[name])}")
    root = Path(root) if root is not None else data_root() / name
    if not root.is_dir():
        raise FineMaskError(f"dataset folder for {name!r} not found (pass root= or set FINEMASK_DATA)", root)
    return _LOADERS[name](root, split)


def _camvid(root: Path, split: str) -> SegmentationDataset:
    lists = [root / "train.txt", root / "val.txt"] if split == "all" else [root / f"{split}.txt"]
    return ListFileDataset(
        lists,
        CAMVID_CLASSES,
        root=root,
        palette=_camvid_palette(root),
        value_map={CAMVID_VOID: 255},
        name=f"camvid-{split}",
    )


def _camvid_palette(root: Path) -> list[list[int]]:
    """First 11 colours of ``palette11.png`` (a 256x1 RGBA strip), else the built-in copy."""
    path = root / "palette11.png"
    if not path.is_file():
        return CAMVID_PALETTE
    strip = np.round(read_image(path).reshape(-1, 3) * 255).astype(int)
    if len(strip) < len(CAMVID_CLASSES):
        raise FineMaskError(f"palette strip has {len(strip)} colours, need {len(CAMVID_CLASSES)}", path)
    return strip[: len(CAMVID_CLASSES)].tolist()


def _dubai(root: Path, split: str) -> SegmentationDataset:
    return FolderDataset(
        root,
        DUBAI_CLASSES,
        palette=DUBAI_PALETTE,
        ignore_index=255,
        include=_split_filter(split, lambda stem: stem.endswith(f"_part_{DUBAI_VAL_PART}")),
        name=f"dubai-{split}",
    )


def _idrid(root: Path, split: str) -> SegmentationDataset:
    return MaskFolderDataset(
        root,
        {c: f"masks_{c}" for c in IDRID_CLASSES},
        precedence=IDRID_PRECEDENCE,
        palette=IDRID_PALETTE,
        include=_split_filter(split, lambda stem: _number(stem) in IDRID_VAL),
        name=f"idrid-{split}",
    )


def _isbi2012(root: Path, split: str) -> SegmentationDataset:
    return FolderDataset(
        root,
        ISBI_CLASSES,
        image_dir="image",
        label_dir="label",
        palette=[[0, 0, 0], [255, 255, 255]],
        value_map={255: 1},
        include=_split_filter(split, lambda stem: _number(stem) in ISBI_VAL),
        name=f"isbi2012-{split}",
    )


def _split_filter(split: str, is_val: Callable[[str], bool]) -> Callable[[str], bool] | None:
    """Stem predicate of a split: ``val`` keeps ``is_val`` stems, ``train`` the others."""
    if split == "all":
        return None
    return lambda stem: is_val(stem) == (split == "val")


def _number(stem: str) -> int:
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else -1


_LOADERS: dict[str, Callable[[Path, str], SegmentationDataset]] = {
    "camvid": _camvid,
    "dubai": _dubai,
    "idrid": _idrid,
    "isbi2012": _isbi2012,
}
