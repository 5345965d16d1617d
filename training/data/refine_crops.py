"""Refinement training crops: (image, ground-truth mask, coarse mask), all ``size`` x ``size``.

``RefineCrops[i] -> (image (3, S, S) float32 in [0, 1], gt (1, S, S), coarse (1, S, S))``, the
masks float32 in {0, 1}. Each sample draws a source, then a crop whose ground truth holds both
foreground and background (the crop is placed on a boundary pixel, at a random scale), then
flip and colour jitter (CascadePSP: ColorJitter(0.2, 0.05, 0.05) and 10 % grayscale), then the
coarse mask from :func:`training.perturb.perturb_mask` (IoU with gt in [0.8, 1]), or with
probability ``lowres_prob`` (default 0, as in CascadePSP) from :func:`training.perturb.lowres_mask`
at a factor drawn log-uniformly from ``lowres_factors``.

Sources:
- :class:`ClassMaskSource`: one class of one image of a :class:`SegmentationDataset` as a binary
  mask (camvid, dubai, isbi2012, idrid: IDRiD uses its raw per-class masks).
- :class:`AlphaCompositeSource`: an alpha matte (gt = alpha > 127) blending a crop of one image
  over a crop of another (from the public-domain backgrounds and CamVid/IDRiD images). The blend
  uses the soft alpha, so edges look like a real matte; the high-resolution mattes give fine
  boundary detail.

Sample ``i`` of epoch ``e`` uses ``np.random.default_rng([seed, e, i])`` (see ``set_epoch``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from engine.errors import FineMaskError
from engine.io import IMAGE_SUFFIXES, read_image, unit_rgb
from training.augment import color_jitter, random_grayscale, random_window, resize_image, resize_mask
from training.perturb import PerturbConfig, lowres_mask, perturb_mask

from .readers import MaskFolderDataset, SegmentationDataset


@dataclass
class RefineCropConfig:
    size: int = 224
    scale_range: tuple[float, float] = (0.25, 1.0)  #: crop scale (log-uniform), raised for small images
    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.05
    saturation: float = 0.05
    grayscale_prob: float = 0.1
    attempts: int = 10  #: tries for a scaled crop holding both classes before falling back to scale 1
    cache_mb: int = 2048  #: per source and worker: decoded large images and masks kept in memory
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    lowres_prob: float = 0.0  #: chance of a shrunk-and-enlarged coarse mask instead (not in CascadePSP)
    lowres_factors: tuple[float, float] = (2.0, 8.0)  #: its shrink factor range (log-uniform)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lowres_prob <= 1.0:
            raise FineMaskError(f"lowres_prob must be in [0, 1], got {self.lowres_prob}")
        lo, hi = self.lowres_factors
        if not 1.0 <= lo <= hi:
            raise FineMaskError(f"lowres_factors must be 1 <= low <= high, got {self.lowres_factors}")


class ClassMaskSource:
    """Binary masks of single classes from a segmentation dataset.

    Per-class mask folders (IDRiD: 4K JPEGs and masks, 0.2 s to decode) are read through a
    least-recently-used cache of ``cache_mb`` per process: the image as uint8, each mask as bits
    with its boundary pixels. The samples are the same as without it.
    """

    def __init__(self, dataset: SegmentationDataset, classes: Sequence[str] | None = None, *,
                 cache_mb: int = 2048):
        self.dataset = dataset
        self.classes = set(classes) if classes is not None else None
        self.name = dataset.name
        self._decoded = _Cache(self._load, max_bytes=cache_mb << 20)

    def sample(self, rng: np.random.Generator, cfg: RefineCropConfig) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(max(cfg.attempts, 1)):
            index = int(rng.integers(len(self.dataset)))
            if isinstance(self.dataset, MaskFolderDataset):  # read only the chosen class's mask
                crop = self._one_class_crop(index, rng, cfg)
                if crop is not None:
                    return crop
                continue
            image, masks = self.dataset.binary_masks(index)
            names = [n for n, m in masks.items() if self._wanted(n) and not m.all()]
            mask = masks[names[int(rng.integers(len(names)))]] if names else None
            if mask is not None and mask.any() and not mask.all():
                return boundary_crop(image, mask, rng, cfg)
        raise FineMaskError(
            f"dataset {self.name!r}: no image with a class boundary found in {cfg.attempts} tries"
        )

    def _wanted(self, name: str) -> bool:
        return self.classes is None or name in self.classes

    def _one_class_crop(self, index: int, rng: np.random.Generator, cfg: RefineCropConfig):
        ds = self.dataset
        names = [c for c in ds.class_dirs if self._wanted(c) and ds.mask_path(index, c) is not None]
        if not names:
            return None
        bits, shape, edges = self._decoded.get((index, names[int(rng.integers(len(names)))]))
        if len(edges) == 0:  # all foreground or all background
            return None
        mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).view(bool)
        image = self._decoded.get((index, None))
        if image.shape[:2] != mask.shape:
            raise FineMaskError(
                f"image is {image.shape[:2]} but its masks are {mask.shape}", ds.image_paths[index]
            )
        (r0, r1, c0, c1), gt = boundary_window(mask, rng, cfg, edges)
        return resize_image(unit_rgb(image[r0:r1, c0:c1]), gt.shape), gt

    def _load(self, key: tuple[int, str | None]):
        index, cls = key
        if cls is None:
            return _read_u8(self.dataset.image_paths[index])
        mask = self.dataset.class_mask(index, cls)
        return np.packbits(mask), mask.shape, edge_pixels(mask)


class AlphaCompositeSource:
    """Alpha mattes compositing one image crop over another.

    ``alpha_paths``: 8-bit alpha mattes; ``image_paths``: images for foreground and background
    (two different ones per sample). Decoded files are cached per process (``cache_mb`` for the
    images, ``cache_items`` mattes); images are kept at most ``image_max_side`` pixels on their
    longer side (JPEGs decoded at a reduced DCT scale first, which is 10x faster on 4K ones),
    mattes at full resolution.
    """

    def __init__(
        self,
        alpha_paths: Sequence[str | Path],
        image_paths: Sequence[str | Path],
        *,
        image_max_side: int = 1024,
        cache_items: int = 32,
        cache_mb: int = 2048,
    ):
        if not alpha_paths or len(image_paths) < 2:
            raise FineMaskError("composites need at least one alpha matte and two images")
        self.alpha_paths = [Path(p) for p in alpha_paths]
        self.image_paths = [Path(p) for p in image_paths]
        self.image_max_side = image_max_side
        self.name = "composites"
        self._alphas = _Cache(self._load_alpha, capacity=cache_items)
        self._images = _Cache(self._load_image, max_bytes=cache_mb << 20)

    def sample(self, rng: np.random.Generator, cfg: RefineCropConfig) -> tuple[np.ndarray, np.ndarray]:
        alpha, edges = self._alphas.get(self.alpha_paths[int(rng.integers(len(self.alpha_paths)))])
        window, gt = boundary_window(alpha > 127, rng, cfg, edges)
        r0, r1, c0, c1 = window
        soft = resize_image(alpha[r0:r1, c0:c1].astype(np.float32) / 255.0, gt.shape)
        fg_i, bg_i = rng.choice(len(self.image_paths), size=2, replace=False)
        fg = self._texture(int(fg_i), rng, cfg)
        bg = self._texture(int(bg_i), rng, cfg)
        image = soft[..., None] * fg + (1.0 - soft[..., None]) * bg
        return np.clip(image, 0.0, 1.0).astype(np.float32), gt

    def _texture(self, index: int, rng: np.random.Generator, cfg: RefineCropConfig) -> np.ndarray:
        image = self._images.get(self.image_paths[index])
        scale = _draw_scale(image.shape[:2], rng, cfg)
        (r0, r1, c0, c1), _ = random_window(image.shape[:2], (cfg.size, cfg.size), scale, rng)
        return resize_image(unit_rgb(image[r0:r1, c0:c1]), (cfg.size, cfg.size))

    def _load_alpha(self, path: Path):
        alpha = np.round(read_image(path)[..., 0] * 255.0).astype(np.uint8)
        mask = alpha > 127
        edges = edge_pixels(mask)
        if len(edges) == 0:
            raise FineMaskError("alpha matte has no boundary (all foreground or all background)", path)
        return alpha, edges

    def _load_image(self, path: Path) -> np.ndarray:
        image = _read_u8(path, self.image_max_side)
        h, w = image.shape[:2]
        if max(h, w) <= self.image_max_side:
            return image
        f = self.image_max_side / max(h, w)
        small = resize_image(unit_rgb(image), (max(1, round(h * f)), max(1, round(w * f))))
        return np.round(small * 255.0).astype(np.uint8)


#: The sources of the standard refinement crop set, in order.
REFINE_SOURCES = ("camvid", "dubai", "isbi2012", "idrid", "composites")


class RefineCrops(Dataset):
    """``length`` samples per epoch drawn from ``sources`` with probabilities ``weights``."""

    def __init__(
        self,
        sources: Sequence[ClassMaskSource | AlphaCompositeSource],
        *,
        weights: Sequence[float] | None = None,
        length: int = 10000,
        config: RefineCropConfig | None = None,
    ):
        if not sources:
            raise ValueError("RefineCrops needs at least one source")
        w = np.ones(len(sources)) if weights is None else np.asarray(weights, float)
        if len(w) != len(sources) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be one non-negative number per source, not all zero")
        self.sources = list(sources)
        self.weights = w / w.sum()
        self.length = int(length)
        self.config = config or RefineCropConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        source = self.sources[int(rng.choice(len(self.sources), p=self.weights))]
        image, gt = source.sample(rng, cfg)
        if cfg.flip and rng.random() < 0.5:
            image, gt = image[:, ::-1], gt[:, ::-1]
        image = color_jitter(image, rng, cfg.brightness, cfg.contrast, cfg.saturation)
        image = random_grayscale(image, rng, cfg.grayscale_prob)
        coarse = coarse_for(gt, rng, cfg)
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None],
            torch.from_numpy(coarse.astype(np.float32))[None],
        )


def coarse_for(gt: np.ndarray, rng: np.random.Generator, cfg: RefineCropConfig) -> np.ndarray:
    """The coarse input of one crop: CascadePSP's perturbation or, with ``cfg.lowres_prob``, a
    low-resolution version of ``gt`` (draws nothing extra from ``rng`` when that is 0)."""
    if cfg.lowres_prob > 0 and rng.random() < cfg.lowres_prob:
        lo, hi = cfg.lowres_factors
        return lowres_mask(gt, float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    return perturb_mask(gt, rng, cfg.perturb)


def boundary_crop(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: RefineCropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A ``cfg.size`` square crop of image (H, W, 3) and mask (H, W) holding both classes."""
    (r0, r1, c0, c1), gt = boundary_window(mask, rng, cfg)
    return resize_image(image[r0:r1, c0:c1], gt.shape), gt


def boundary_window(
    mask: np.ndarray, rng: np.random.Generator, cfg: RefineCropConfig, edges: np.ndarray | None = None
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A source window (r0, r1, c0, c1) around a random boundary pixel, and its resized mask.

    The window is drawn at a random scale; if resizing loses one class ``cfg.attempts`` times,
    the window is taken at scale 1 (or the smallest scale that fits), which always keeps both.
    """
    edges = edge_pixels(mask) if edges is None else edges
    if len(edges) == 0:
        raise ValueError("mask has no boundary: it is all foreground or all background")
    out = (cfg.size, cfg.size)
    for attempt in range(cfg.attempts + 1):
        scale = (
            _draw_scale(mask.shape, rng, cfg) if attempt < cfg.attempts else _min_scale(mask.shape, cfg, 1.0)
        )
        point = divmod(int(edges[int(rng.integers(len(edges)))]), mask.shape[1])
        window, _ = random_window(mask.shape, out, scale, rng, contains=point)
        r0, r1, c0, c1 = window
        gt = resize_mask(mask[r0:r1, c0:c1], out)
        if gt.any() and not gt.all():
            return window, gt
    return window, gt  # unreachable in practice: at scale >= 1 the edge pixel pair survives


def edge_pixels(mask: np.ndarray) -> np.ndarray:
    """Flat indices of pixels whose lower or right neighbour has the other value."""
    edge = np.zeros(mask.shape, bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    return np.flatnonzero(edge)


def build_refine_crops(
    root: str | Path | None = None,
    split: str = "train",
    sources: Sequence[str] = REFINE_SOURCES,
    weights: Mapping[str, float] | None = None,
    length: int = 10000,
    config: RefineCropConfig | None = None,
) -> RefineCrops:
    """The standard refinement crop set from the data folder (``root`` holds camvid/, idrid/, ...).

    Composites use all alpha mattes in ``alphamatting/alpha``, and the backgrounds plus the
    ``split`` images of CamVid and IDRiD as foreground/background pictures.
    """
    from .registry import data_root, load_dataset

    config = config or RefineCropConfig()
    root = Path(root) if root is not None else data_root()
    built = []
    for name in sources:
        if name == "composites":
            pictures = _image_files(root / "alphamatting" / "backgrounds")
            for ds_name in ("camvid", "idrid"):
                if (root / ds_name).is_dir():
                    pictures += load_dataset(ds_name, split, root / ds_name).image_paths
            built.append(AlphaCompositeSource(_image_files(root / "alphamatting" / "alpha"), pictures,
                                              cache_mb=config.cache_mb))
        else:
            built.append(ClassMaskSource(load_dataset(name, split, root / name), cache_mb=config.cache_mb))
    w = None if weights is None else [weights.get(n, 0.0) for n in sources]
    return RefineCrops(built, weights=w, length=length, config=config)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FineMaskError("folder not found", folder)
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def _min_scale(shape: tuple[int, int], cfg: RefineCropConfig, scale: float) -> float:
    return max(scale, cfg.size / min(shape))


def _draw_scale(shape: tuple[int, int], rng: np.random.Generator, cfg: RefineCropConfig) -> float:
    lo, hi = (_min_scale(shape, cfg, s) for s in cfg.scale_range)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _read_u8(path: Path, max_side: int | None = None) -> np.ndarray:
    """An image as uint8 RGB: ``read_image(path) * 255`` exactly, without the float copy.

    With ``max_side``, a JPEG longer than that is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that keeps its longer side at least ``max_side`` (10x faster on 4K fundus images).
    """
    try:
        with Image.open(path) as img:
            if img.mode == "RGB":
                w, h = img.size
                if max_side is not None and max(w, h) > max_side and img.format == "JPEG":
                    f = max_side / max(w, h)
                    img.draft("RGB", (max(1, round(w * f)), max(1, round(h * f))))
                return np.asarray(img)
    except (OSError, ValueError):
        pass  # read_image names the file and the problem
    return np.round(read_image(path) * 255.0).astype(np.uint8)


def _nbytes(value) -> int:
    parts = value if isinstance(value, tuple) else (value,)
    return sum(p.nbytes for p in parts if isinstance(p, np.ndarray))


class _Cache:
    """A least-recently-used cache of ``load(key)`` results: at most ``capacity`` items and
    ``max_bytes`` of arrays, where given (the newest item is always kept)."""

    def __init__(self, load: Callable, *, capacity: int | None = None, max_bytes: int | None = None):
        self.load, self.items = load, OrderedDict()
        self.capacity, self.max_bytes, self.bytes = capacity, max_bytes, 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = self.load(key)
        self.bytes += _nbytes(value)
        while len(self.items) > 1 and (
            (self.capacity is not None and len(self.items) > self.capacity)
            or (self.max_bytes is not None and self.bytes > self.max_bytes)
        ):
            self.bytes -= _nbytes(self.items.popitem(last=False)[1])
        return value
