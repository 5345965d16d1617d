"""Segmentation dataset readers: a list file of pairs, images/ + labels/ folders, per-class masks.

Every reader is indexable: ``ds[i] -> (image float32 (H, W, 3) in [0, 1], labels (H, W) uint8 or
uint16)`` and carries ``classes`` (names, index = class id), ``palette`` (one RGB triple per class)
and ``ignore_index`` (label value that marks unannotated pixels). ``ds.binary_masks(i)`` gives
the image and one bool mask per class present, which the refinement crops use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from engine.errors import FineMaskError
from engine.io import IMAGE_SUFFIXES, LABEL_SUFFIXES, default_palette, read_image, read_labels, unit_rgb
from training.augment import resize_image, resize_labels


class SegmentationDataset:
    """Base class: subclasses fill ``image_paths`` and implement :meth:`load_labels`."""

    def __init__(
        self,
        name: str,
        image_paths: Sequence[Path],
        classes: Sequence[str],
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
    ):
        if not image_paths:
            raise FineMaskError(f"dataset {name!r} holds no image/label pairs")
        if ignore_index < len(classes):
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (< {len(classes)})")
        self.name = name
        self.image_paths = [Path(p) for p in image_paths]
        self.classes = list(classes)
        self.palette = [list(map(int, c[:3])) for c in (palette or default_colours(len(classes)))]
        if len(self.palette) < len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes")
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.image_paths[index])
        return image, self.load_labels(index, image.shape[:2])

    def stem(self, index: int) -> str:
        return self.image_paths[index].stem

    def load_labels(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        raise NotImplementedError

    def binary_masks(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The image and ``{class name: bool mask}`` for each class present (ignored pixels are 0)."""
        image, labels = self[index]
        present = np.flatnonzero(
            np.bincount(labels.ravel(), minlength=len(self.classes))[: len(self.classes)]
        )
        return image, {self.classes[c]: labels == c for c in present}

    def _checked(self, labels: np.ndarray, path: Path) -> np.ndarray:
        """Raise if the labels hold values that are neither a class id nor the ignore index."""
        if int(labels.max()) >= len(self.classes):
            bad = sorted(
                set(np.unique(labels).tolist()) - set(range(len(self.classes))) - {self.ignore_index}
            )
            if bad:
                raise FineMaskError(
                    f"label values {bad[:10]} are not class ids 0..{len(self.classes) - 1} "
                    f"nor the ignore index {self.ignore_index}",
                    path,
                )
        return labels


class _PairedLabels(SegmentationDataset):
    """Datasets whose labels are one index map per image, optionally remapped by a lookup table."""

    def __init__(self, name, image_paths, label_paths, classes, palette, ignore_index, value_map):
        super().__init__(name, image_paths, classes, palette, ignore_index)
        self.label_paths = [Path(p) for p in label_paths]
        self.value_map = dict(value_map or {})

    def load_labels(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        path = self.label_paths[index]
        labels = read_labels(path, shape=shape)
        if self.value_map:
            lut = np.arange(max(int(labels.max()) + 1, max(self.value_map) + 1), dtype=np.int64)
            for src, dst in self.value_map.items():
                lut[src] = dst
            dtype = np.uint8 if lut.max() < 256 else np.uint16
            labels = lut.astype(dtype)[labels]
        return self._checked(labels, path)


class ListFileDataset(_PairedLabels):
    """Pairs listed in text files, one ``image label`` pair per line (CamVid's train.txt).

    ``list_file`` is one file or several (concatenated). Paths are relative to ``root``
    (default: the first list file's folder) unless absolute; blank lines
    and lines starting with ``#`` are skipped. ``value_map`` remaps label values on reading
    (CamVid: ``{11: 255}`` turns void into the ignore index).
    """

    def __init__(
        self,
        list_file: str | Path | Sequence[str | Path],
        classes: Sequence[str],
        *,
        root: str | Path | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        value_map: Mapping[int, int] | None = None,
        name: str | None = None,
    ):
        files = [Path(list_file)] if isinstance(list_file, (str, Path)) else [Path(f) for f in list_file]
        root = Path(root) if root is not None else files[0].parent
        images, labels = [], []
        for file in files:
            for image, label in _read_pairs(file, root):
                images.append(image)
                labels.append(label)
        super().__init__(name or files[0].stem, images, labels, classes, palette, ignore_index, value_map)


class FolderDataset(_PairedLabels):
    """``root/images/*`` paired with ``root/labels/*`` by file stem (the annotation store layout).

    ``label_dir=None`` takes ``labels/`` or, failing that, ``masks/`` (Dubai). Images without a
    label (not annotated yet) and labels without an image are left out; ``include(stem)``
    selects the pairs of a split.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        *,
        image_dir: str = "images",
        label_dir: str | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        value_map: Mapping[int, int] | None = None,
        include: Callable[[str], bool] | None = None,
        name: str | None = None,
    ):
        root = Path(root)
        if label_dir is None:
            label_dir = next((d for d in ("labels", "masks") if (root / d).is_dir()), "labels")
        images = _files_by_stem(root / image_dir, IMAGE_SUFFIXES)
        labels = _files_by_stem(root / label_dir, LABEL_SUFFIXES)
        common = [s for s in sorted(set(images) & set(labels)) if include is None or include(s)]
        super().__init__(
            name or root.name,
            [images[s] for s in common],
            [labels[s] for s in common],
            classes,
            palette,
            ignore_index,
            value_map,
        )


class MaskFolderDataset(SegmentationDataset):
    """An image folder plus one folder of binary masks per class (IDRiD's layout).

    ``class_dirs`` maps class name -> folder (relative to ``root``); a mask is the file with the
    image's stem (any label suffix), foreground where the value is > 127 (0/255 files) or == 1
    (0/1 files). A missing file means the class is absent from that image. The index map has
    background 0 and class ``i + 1`` for the i-th entry of ``class_dirs``; where masks overlap,
    the class listed first in ``precedence`` wins (default: the order of ``class_dirs``).
    ``include(stem)`` selects the images of a split.
    """

    def __init__(
        self,
        root: str | Path,
        class_dirs: Mapping[str, str],
        *,
        image_dir: str = "images",
        precedence: Sequence[str] | None = None,
        background: str = "background",
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        include: Callable[[str], bool] | None = None,
        name: str | None = None,
    ):
        root = Path(root)
        images = _files_by_stem(root / image_dir, IMAGE_SUFFIXES)
        self.class_dirs = {c: root / d for c, d in class_dirs.items()}
        for cls, folder in self.class_dirs.items():
            if not folder.is_dir():
                raise FineMaskError(f"mask folder for class {cls!r} not found", folder)
        self.precedence = list(precedence or class_dirs)
        if sorted(self.precedence) != sorted(class_dirs):
            raise ValueError("precedence must list every class of class_dirs once")
        self._masks = {c: _files_by_stem(f, LABEL_SUFFIXES) for c, f in self.class_dirs.items()}
        keep = [s for s in sorted(images) if include is None or include(s)]
        super().__init__(
            name or root.name, [images[s] for s in keep], [background, *class_dirs], palette, ignore_index
        )

    def mask_path(self, index: int, cls: str) -> Path | None:
        """The mask file of class ``cls`` for image ``index``, or None when the class is absent."""
        return self._masks[cls].get(self.stem(index))

    def class_mask(self, index: int, cls: str, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """Bool mask (H, W) of one class, or None when its file is missing."""
        path = self.mask_path(index, cls)
        if path is None:
            return None
        raw = read_labels(path, shape=shape)
        return raw > 127 if raw.max() > 1 else raw > 0

    def binary_masks(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The image and the raw mask of every class whose file exists and is not empty."""
        image = read_image(self.image_paths[index])
        masks = {}
        for cls in self.class_dirs:
            mask = self.class_mask(index, cls, image.shape[:2])
            if mask is not None and mask.any():
                masks[cls] = mask
        return image, masks

    def load_labels(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        labels = None
        for cls in reversed(self.precedence):  # highest precedence painted last
            mask = self.class_mask(index, cls, shape)
            if mask is None:
                continue
            if labels is None:
                labels = np.zeros(mask.shape, np.uint8)
            labels[mask] = self.classes.index(cls)
        if labels is None:
            if shape is None:
                shape = read_image(self.image_paths[index]).shape[:2]
            labels = np.zeros(shape, np.uint8)
        return labels


class CachedDataset(SegmentationDataset):
    """Keeps the items of ``base`` in memory (uint8 images), optionally rescaled by ``scale``.

    For datasets whose files are slow to decode (IDRiD's 4K images: ~1 s per item). Items are
    cached on first access; :meth:`preload` fills the cache up front (do it before DataLoader
    workers fork, so they share it). Labels are resized nearest-neighbour, images anti-aliased.
    """

    def __init__(self, base: SegmentationDataset, scale: float = 1.0):
        super().__init__(base.name, base.image_paths, base.classes, base.palette, base.ignore_index)
        self.base, self.scale = base, float(scale)
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._items:
            image, labels = self.base[index]
            if self.scale != 1.0:
                shape = (
                    max(1, round(labels.shape[0] * self.scale)),
                    max(1, round(labels.shape[1] * self.scale)),
                )
                image, labels = resize_image(image, shape), resize_labels(labels, shape)
            self._items[index] = (np.round(image * 255.0).astype(np.uint8), labels)
        return self._items[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self._item(index)
        return unit_rgb(image), labels.copy()

    def load_labels(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        return self._item(index)[1].copy()

    def preload(self, on_progress=None, cancel=None) -> None:
        """Decode every item now; ``on_progress(done, total, message)``, ``cancel() -> bool``."""
        for i in range(len(self)):
            if cancel is not None and cancel():
                return
            self._item(i)
            if on_progress is not None:
                on_progress(i + 1, len(self), f"loaded {self.stem(i)}")


def default_colours(n: int) -> list[list[int]]:
    """Fallback palette: class 0 black, then well-separated colours."""
    return default_palette(max(n, 1))[:n]


def _read_pairs(list_file: Path, root: Path) -> list[tuple[Path, Path]]:
    if not list_file.is_file():
        raise FineMaskError("list file not found", list_file)
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FineMaskError(f"line {number}: expected 'image label', found {line!r}", list_file)
        pair = [p if p.is_absolute() else root / p for p in map(Path, parts)]
        for p in pair:
            if not p.is_file():
                raise FineMaskError(f"line {number}: file not found: {p}", list_file)
        pairs.append((pair[0], pair[1]))
    return pairs


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FineMaskError("folder not found", folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in found:
                raise FineMaskError(
                    f"two files share the name {path.stem!r}: {found[path.stem].name}, {path.name}", folder
                )
            found[path.stem] = path
    return found
