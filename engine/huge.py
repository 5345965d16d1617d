"""Huge images (e.g. 20000 x 20000 TIFF or zarr): read lazily, segment, refine tile by tile.

Nothing here holds the image whole, in any dtype:

- ``LazyImage``: a TIFF page or a zarr array read one crop at a time (``image[rows, cols]`` ->
  (h, w, 3) in the file's dtype). Uncompressed TIFFs are memory-mapped; compressed or tiled ones
  are read through tifffile's zarr view (needs the ``zarr`` package), which decodes only the
  strips or tiles a crop touches.
- ``segment_lazy``: the segmenter on the image shrunk to its working size in row strips;
  ``CoarseSegmentation`` then gives full-size labels built strip by strip and class probabilities
  as a lazy (C, H, W) array.
- ``refine_labels_tiled``: ``Refiner.refine_labels`` with the local step's tile batches handed to a
  ``TileRunner`` - in-process (``local_tiles``) or on a Dask cluster (``engine.batch``). Batches
  are the same as ``Refiner.local_step``'s for the same ``batch_size`` and are blended in the same
  order, so the result equals ``Refiner.refine_labels`` on the whole image exactly.

Full-size buffers are those ``Refiner.refine_labels`` needs anyway: the labels (1-2 bytes per
pixel), the best confidence and the tile sum (float32), the tile count (uint8) and one class's
boolean mask: about 11 bytes per pixel (4.4 GB at 20000 x 20000).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from .errors import Cancelled, FineMaskError
from .io import image_shape, max_pixels_limit, unit_rgb
from .preprocess import fit_longer_side, resize, to_tensor, upsample_rows
from .refine import GlobalResult, Refiner, arbitrate_classes, coarse_as_global
from .refine.refiner import check_options
from .refine.results import keep_unseen
from .tiling import STRIP_ROWS, Tile, area_resize

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]
Box = tuple[int, int, int, int]
#: (box, global result, tile batches) -> one (n, th, tw) float32 prediction per batch, in order.
TileRunner = Callable[[Box, GlobalResult, list[list[Tile]]], Iterable[np.ndarray]]

#: Images with more pixels than this take the lazy path (about 6000 x 6000). Below it, reading
#: the image whole as float32 RGB and keeping full-size float16 class probabilities (12 bytes +
#: 2 per class per pixel, about 1.2 GB for 11 classes) is cheaper than strip-wise work.
HUGE_PIXELS = 36_000_000
#: Upper bound on pixels of an image read lazily (65536 x 65536).
HUGE_MAX_PIXELS = 1 << 32
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"
_DTYPES = (np.uint8, np.uint16, np.bool_, np.float16, np.float32, np.float64)


def is_lazy_readable(path: str | Path) -> bool:
    """Whether ``LazyImage`` can read ``path`` (a TIFF file or a ``.zarr`` folder)."""
    path = Path(path)
    return path.suffix.lower() in TIFF_SUFFIXES or (path.suffix.lower() == ZARR_SUFFIX and path.is_dir())


class LazyImage:
    """An image file read one crop at a time; a context manager (closes the file).

    ``shape`` is (H, W, 3); ``image[rows, cols]`` (slices) returns an (h, w, 3) array in the file's
    dtype (uint8, uint16, bool or float in [0, 1]): gray is repeated to RGB, alpha is dropped,
    channel-first layouts are moved last - as ``engine.io.read_image`` does. Problems are
    ``FineMaskError``s naming the file. Zarr input: an array, or a group holding an array ``0``
    (e.g. the full-resolution level of OME-Zarr); leading axes of length 1 are dropped.
    """

    ndim = 3

    def __init__(self, path: str | Path, *, max_pixels: int | None = HUGE_MAX_PIXELS):
        self.path = Path(path)
        self._max_pixels = max_pixels_limit(max_pixels)
        self._closers: list[Callable[[], Any]] = []
        try:
            self._array = self._open()
            self._layout(self._array.shape, np.dtype(self._array.dtype))
            if self.height * self.width > self._max_pixels:
                raise FineMaskError(f"image has {self.height * self.width:,} pixels, more than the limit of "
                                    f"{self._max_pixels:,}", self.path)
        except FineMaskError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile / zarr raise many types for damaged files
            self.close()
            raise FineMaskError(f"cannot open image for reading in parts ({type(exc).__name__}: {exc})",
                                self.path) from None

    # ---------------------------------------------------------------- opening

    def _open(self) -> Any:
        if not self.path.exists():
            raise FineMaskError("file not found", self.path)
        suffix = self.path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            image_shape(self.path, max_pixels=self._max_pixels)  # engine.io's checks and messages
            tif = tifffile.TiffFile(self.path)
            self._closers.append(tif.close)
            if not tif.pages:
                raise FineMaskError("TIFF holds no image", self.path)
            page = tif.pages[0]  # the first page, as engine.io.read_image
            if page.is_memmappable:
                return tif.pages[0].asarray(out="memmap")
            store = page.aszarr()
            self._closers.append(store.close)
            return _zarr().open(store, mode="r")
        if suffix == ZARR_SUFFIX and self.path.is_dir():
            node = _zarr().open(str(self.path), mode="r")
            if not hasattr(node, "shape"):  # a group
                names = sorted(k for k, _ in node.arrays())
                if not names:
                    raise FineMaskError("zarr group holds no array", self.path)
                node = node["0"] if "0" in names else node[names[0]]
            return node
        raise FineMaskError(f"cannot read {suffix!r} files in parts (use TIFF or a .zarr folder)", self.path)

    def _layout(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype.type not in _DTYPES:
            raise FineMaskError(f"unsupported pixel type {dtype} (use 8/16-bit integers or float in [0, 1])",
                                self.path)
        lead = 0
        while len(shape) - lead > 3 and shape[lead] == 1:
            lead += 1
        shape = tuple(shape[lead:])
        self._lead = (0,) * lead
        if len(shape) == 3 and shape[-1] not in (1, 2, 3, 4) and shape[0] in (1, 2, 3, 4):
            self._channel_first = True
            channels, self.height, self.width = shape
        elif len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
            self._channel_first = False
            self.height, self.width, channels = shape
        elif len(shape) == 2:
            self._channel_first = False
            (self.height, self.width), channels = shape, 0
        else:
            raise FineMaskError(f"not a 2-D image: array shape {shape}", self.path)
        if min(self.height, self.width) < 1:
            raise FineMaskError(f"image has zero size {shape}", self.path)
        self._channels = channels
        self.dtype = dtype

    # ---------------------------------------------------------------- reading

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = (key, slice(None)) if not isinstance(key, tuple) else (tuple(key) + (slice(None),))[:2]
        if not isinstance(rows, slice) or not isinstance(cols, slice):
            raise TypeError("LazyImage supports slices only: image[r0:r1, c0:c1]")
        index = self._lead + ((slice(None), rows, cols) if self._channel_first else (rows, cols))
        try:
            crop = np.asarray(self._array[index])
        except Exception as exc:  # noqa: BLE001 - as above, for damaged pixel data
            raise FineMaskError(f"cannot read pixels: corrupt or truncated file ({type(exc).__name__}: {exc})",
                                self.path) from None
        if not crop.dtype.isnative:  # big-endian files: native order, so dtype checks hold
            crop = crop.astype(crop.dtype.newbyteorder("="))
        if self._channel_first:
            crop = np.moveaxis(crop, 0, -1)
        if crop.ndim == 2:
            crop = crop[:, :, None]
        if self._channels in (2, 4):
            crop = crop[:, :, : self._channels - 1]
        if crop.shape[2] == 1:
            crop = np.repeat(crop, 3, axis=2)
        if crop.dtype.kind == "f" and crop.size:
            if not np.isfinite(crop).all():
                raise FineMaskError("image contains NaN or infinite values", self.path)
            lo, hi = float(crop.min()), float(crop.max())
            if lo < 0.0 or hi > 1.0:
                raise FineMaskError(f"float image values must lie in [0, 1], found {lo:g}..{hi:g}", self.path)
        return crop

    def crop(self, box: Box) -> ImageCrop:
        """A lazy view of rows [y0, y1) x cols [x0, x1)."""
        return ImageCrop(self, box)

    def read(self) -> np.ndarray:
        """The whole image (for small ones): float32 RGB (H, W, 3) in [0, 1]."""
        return unit_rgb(self[0:self.height, 0:self.width], copy=True)

    def close(self) -> None:
        self._array = None
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()

    def __enter__(self) -> LazyImage:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageCrop:
    """A box of a ``LazyImage`` (or of an array), sliced in its own coordinates."""

    ndim = 3

    def __init__(self, source: Any, box: Box):
        self.source, self.box = source, box
        y0, y1, x0, x1 = box
        self.shape = (y1 - y0, x1 - x0, 3)
        self.dtype = source.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = (key, slice(None)) if not isinstance(key, tuple) else (tuple(key) + (slice(None),))[:2]
        y0, y1, x0, x1 = self.box
        r = range(y0, y1)[rows]
        c = range(x0, x1)[cols]
        if r.step != 1 or c.step != 1:
            raise TypeError("ImageCrop supports contiguous slices only")
        return np.asarray(self.source[r.start:r.stop, c.start:c.stop])


def crop_of(image: Any, box: Box) -> Any:
    """``image`` restricted to ``box``: lazy for a ``LazyImage``, a view for an array."""
    if isinstance(image, LazyImage):
        return image.crop(box)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1]


def _zarr():
    try:
        import zarr
    except ImportError:
        raise FineMaskError("reading compressed TIFFs and zarr in parts needs the zarr package "
                            "(pip install 'finemask[distributed]')") from None
    return zarr


# --------------------------------------------------------------------------------------------
# Segmentation at working size.


@dataclass
class CoarseSegmentation:
    """A segmenter's output for a huge image: ``low`` (C, h, w) float32 class probabilities at the
    model's output size, ``full_shape`` (H, W). Full-size results are made one strip at a time."""

    low: torch.Tensor
    full_shape: tuple[int, int]

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        H, W = self.full_shape
        if tuple(self.low.shape[-2:]) == (H, W):
            return self.low[:, r0:r1]
        return upsample_rows(self.low, (H, W), r0, r1)

    def labels(self) -> np.ndarray:
        """(H, W) argmax of the upsampled probabilities; uint8, or uint16 beyond 256 classes.

        The same values ``Segmenter.predict`` gives from the same low-resolution probabilities."""
        H, W = self.full_shape
        C = self.low.shape[0]
        out = np.empty((H, W), np.uint8 if C <= 256 else np.uint16)
        for r0 in range(0, H, STRIP_ROWS):
            r1 = min(H, r0 + STRIP_ROWS)
            out[r0:r1] = self._rows(r0, r1).argmax(dim=0).numpy()
        return out

    def probs(self) -> LazyProbs:
        return LazyProbs(self)


class LazyProbs:
    """(C, H, W) float16 class probabilities computed on indexing (``probs[:, r0:r1]``), equal to
    ``SegResult.probs`` for the same low-resolution probabilities."""

    ndim = 3
    dtype = np.dtype(np.float16)

    def __init__(self, coarse: CoarseSegmentation):
        self.coarse = coarse
        self.shape = (int(coarse.low.shape[0]), *coarse.full_shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = (tuple(key) if isinstance(key, tuple) else (key,)) + (slice(None),) * 3
        chans, rows, cols = key[:3]
        if not isinstance(rows, slice):
            raise TypeError("LazyProbs supports row slices only: probs[:, r0:r1]")
        r = range(self.shape[1])[rows]
        return self.coarse._rows(r.start, r.stop).numpy().astype(np.float16)[chans][:, :, cols]


def segment_lazy(segmenter: Any, image: Any, working_size: int | None = None) -> CoarseSegmentation:
    """Run ``segmenter`` (an ``engine.segment.Segmenter``) on ``image`` (a ``LazyImage`` or an array
    of the same layout) shrunk to its working size.

    Deviation from ``Segmenter.predict``: the image is shrunk by area averaging in row strips
    (``engine.tiling.area_resize``), not by antialiased bilinear resizing, which needs the whole
    image as float32 in memory. Both average the pixels each output covers; labels differ only
    where classes are near a tie.
    """
    H, W = image.shape[:2]
    longer = int(working_size or segmenter.working_size)
    if longer < 8:
        raise FineMaskError(f"working size {longer} is too small (at least 8 pixels)")
    h, w = fit_longer_side(H, W, longer)
    if h <= H and w <= W:
        small = torch.from_numpy(area_resize(image, h, w, convert=unit_rgb)).permute(2, 0, 1)[None]
    else:  # smaller than the working size: small enough to read whole, enlarged as predict does
        small = resize(to_tensor(unit_rgb(np.asarray(image[0:H, 0:W]), copy=True))[None], (h, w))
    low = segmenter.logits(small).softmax(dim=1).float().cpu()[0]  # what predict_batch runs after resizing
    return CoarseSegmentation(low=low, full_shape=(H, W))


# --------------------------------------------------------------------------------------------
# Refinement with the local step's tiles run anywhere.


def local_tiles(image: Any, refiner: Refiner) -> TileRunner:
    """A ``TileRunner`` running every batch in this process, in order."""

    def run(box: Box, glob: GlobalResult, batches: list[list[Tile]]) -> Iterator[np.ndarray]:
        view = crop_of(image, box)
        for batch in batches:
            yield refiner.predict_tiles(view, glob, batch)

    return run


def refine_labels_tiled(image: Any, labels: np.ndarray, probs: Any, refiner: Refiner, *, L: int = 900,
                        fast: bool = False, selection: str | None = None, batch_size: int = 1,
                        run_tiles: TileRunner | None = None, on_progress: ProgressFn | None = None,
                        cancel: CancelFn | None = None, skip_global: bool = False) -> np.ndarray:
    """``Refiner.refine_labels(image, labels, probs, ...)`` for an image read lazily.

    ``image``: a ``LazyImage`` (or an array); ``labels``: (H, W) class indices in memory;
    ``probs``: (C, H, W) probabilities indexable by row strips (``LazyProbs``, an array) or None.
    The class loop, bounding boxes and arbitration are ``Refiner.refine_labels``' own
    (``engine.refine.arbitrate_classes``); each class's local step goes through ``run_tiles``
    (default: in-process) in fixed batches of ``batch_size`` tiles. ``skip_global``: as
    ``Refiner.refine``. Returns labels like ``labels``. Raises ``engine.errors.Cancelled``.
    """
    selection = check_options(selection or refiner.selection, L, fast, skip_global)
    run_tiles = run_tiles or local_tiles(image, refiner)
    H, W = labels.shape
    if tuple(image.shape[:2]) != (H, W):
        raise FineMaskError(f"labels {labels.shape} do not match the image size {tuple(image.shape[:2])}")

    def refine_box(box: Box, mask: np.ndarray, progress: ProgressFn | None) -> np.ndarray:
        return _refine_box(image, box, mask, refiner, L=L, fast=fast, skip_global=skip_global, selection=selection,
                           batch_size=batch_size, run_tiles=run_tiles,
                           on_progress=progress or (lambda d, t, m: None), cancel=cancel)

    return arbitrate_classes(labels, probs, refine_box, on_progress=on_progress)


def _refine_box(image: Any, box: Box, mask: np.ndarray, refiner: Refiner, *, L: int, fast: bool,
                skip_global: bool, selection: str, batch_size: int, run_tiles: TileRunner,
                on_progress: ProgressFn, cancel: CancelFn | None) -> np.ndarray:
    """``Refiner.refine`` of ``mask`` on the ``box`` of ``image``: float32 confidence of the box."""
    _check_cancel(cancel)
    h, w = mask.shape
    if skip_global:  # no image read here: the tile runner reads its tiles' crops
        on_progress(0, 1, "reading the mask")
        glob = coarse_as_global(mask, lambda a: a)
    else:
        view = crop_of(image, box)
        if max(h, w) <= L:  # the global step reads a crop this small whole
            view = np.asarray(view[0:h, 0:w])
        on_progress(0, 1, "global step")
        glob = refiner.global_step(view, mask, lambda a: a, L)
    if fast:
        on_progress(1, 1, "done")
        return keep_unseen(refiner.upsample_global(glob), mask, glob, fast=True)
    conf = refiner.local_step(crop_of(image, box), glob, L, selection=selection, batch_size=batch_size,
                              on_progress=on_progress, cancel=cancel,
                              run_batches=lambda batches: run_tiles(box, glob, batches))
    return keep_unseen(conf, mask, glob)


def _check_cancel(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("refinement cancelled")


__all__ = ["HUGE_MAX_PIXELS", "HUGE_PIXELS", "CoarseSegmentation", "ImageCrop", "LazyImage", "LazyProbs",
           "TileRunner", "crop_of", "is_lazy_readable", "local_tiles", "refine_labels_tiled", "segment_lazy"]
