"""Dataset readers, the registry, DSRL pairs and refinement crops on small fixtures made here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import FineMaskError
from engine.io import read_image, write_image, write_labels
from training.augment import downscale_by_2, resize_labels
from training.data import (
    AlphaCompositeSource,
    CachedDataset,
    ClassMaskSource,
    DSRLPairConfig,
    DSRLPairs,
    FolderDataset,
    ListFileDataset,
    MaskFolderDataset,
    RefineCropConfig,
    RefineCrops,
    load_dataset,
)
from training.data.refine_crops import _Cache, _nbytes, _read_u8, coarse_for
from training.perturb import lowres_mask, mask_iou, perturb_mask

H, W = 90, 150  # non-square on purpose


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _labels(seed: int, values, h: int = H, w: int = W) -> np.ndarray:
    """Blocky labels (8 px cells) drawn from ``values``: real boundaries, every value present."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(values, size=(-(-h // 8), -(-w // 8)))
    cells.flat[: len(values)] = values
    return np.kron(cells, np.ones((8, 8), int))[:h, :w].astype(np.uint8)


def _disk_mask(h, w, centre, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


# --- fixtures on disk ------------------------------------------------------------------------


@pytest.fixture
def camvid_like(tmp_path: Path) -> Path:
    """train/ + trainannot/ with list files; labels use 0..10 and void 11; a palette strip."""
    root = tmp_path / "camvid"
    for split, n in (("train", 3), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = ["# image label", ""]
        for i in range(n):
            write_image(root / split / f"{split}{i}.png", _image(i))
            write_labels(root / f"{split}annot" / f"{split}{i}.png", _labels(i, list(range(12))))
            lines.append(f"{split}/{split}{i}.png {split}annot/{split}{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    strip = np.zeros((1, 256, 4), np.uint8)
    strip[0, :, 3] = 255
    strip[0, :12, :3] = np.arange(36).reshape(12, 3) * 7
    Image.fromarray(strip, "RGBA").save(root / "palette11.png")
    return root


@pytest.fixture
def dubai_like(tmp_path: Path) -> Path:
    """images/*.jpg + masks/*.png by stem, part_009 of each tile is 'val'; one image unlabelled."""
    root = tmp_path / "dubai"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for tile in (1, 2):
        for part in (1, 2, 9):
            stem = f"tile{tile}_image_part_{part:03d}"
            Image.fromarray(_image(tile * 10 + part)).save(root / "images" / f"{stem}.jpg")
            write_labels(root / "masks" / f"{stem}.png", _labels(part, [0, 1, 2, 3, 4, 5, 255]))
    Image.fromarray(_image(99)).save(root / "images" / "tile3_image_part_001.jpg")  # no mask
    return root


IDRID_CLASSES = ["microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates", "optic_disc"]


@pytest.fixture
def idrid_like(tmp_path: Path) -> Path:
    """images/ + masks_<class>/ {0,255} PNGs; soft exudates missing for IDRiD_44; overlaps."""
    root = tmp_path / "idrid"
    (root / "images").mkdir(parents=True)
    for c in IDRID_CLASSES:
        (root / f"masks_{c}").mkdir()
    for n in (44, 45):
        stem = f"IDRiD_{n:02d}"
        Image.fromarray(_image(n)).save(root / "images" / f"{stem}.jpg")
        masks = {
            "optic_disc": _disk_mask(H, W, (45, 100), 30),
            "haemorrhages": _disk_mask(H, W, (45, 75), 12),  # overlaps the optic disc
            "microaneurysms": _disk_mask(H, W, (45, 70), 3),  # inside the haemorrhage
            "hard_exudates": _disk_mask(H, W, (20, 20), 8),
            "soft_exudates": _disk_mask(H, W, (70, 20), 6),
        }
        for c, m in masks.items():
            if c == "soft_exudates" and n == 44:
                continue  # missing file = class absent
            Image.fromarray(m.astype(np.uint8) * 255).save(root / f"masks_{c}" / f"{stem}.png")
    return root


# --- readers ---------------------------------------------------------------------------------


def test_list_file_reader_maps_void_to_ignore(camvid_like):
    ds = ListFileDataset(camvid_like / "train.txt", [f"c{i}" for i in range(11)], value_map={11: 255})
    assert len(ds) == 3 and ds.ignore_index == 255 and len(ds.palette) == 11
    image, labels = ds[1]
    assert image.shape == (H, W, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    raw = _labels(1, list(range(12)))
    assert np.array_equal(labels, np.where(raw == 11, 255, raw))
    assert np.allclose(image, _image(1) / 255.0, atol=1e-6)


def test_list_file_errors_name_the_file(camvid_like):
    classes = [f"c{i}" for i in range(11)]
    bad = camvid_like / "bad.txt"
    bad.write_text("train/train0.png\n")
    with pytest.raises(FineMaskError, match="bad.txt"):
        ListFileDataset(bad, classes)
    bad.write_text("train/nope.png trainannot/train0.png\n")
    with pytest.raises(FineMaskError, match="nope.png"):
        ListFileDataset(bad, classes)
    ds = ListFileDataset(camvid_like / "train.txt", classes)  # void 11 not remapped: invalid
    with pytest.raises(FineMaskError, match=r"train0\.png.*\[11\]"):
        ds[0]


def test_folder_reader_matches_by_stem(dubai_like):
    ds = FolderDataset(dubai_like, [f"c{i}" for i in range(6)])  # finds masks/ when labels/ is absent
    assert [ds.stem(i) for i in range(len(ds))] == sorted(
        f"tile{t}_image_part_{p:03d}" for t in (1, 2) for p in (1, 2, 9)
    )  # the unlabelled image is left out
    image, labels = ds[0]
    assert image.shape == (H, W, 3)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 255}
    sub = FolderDataset(
        dubai_like, [f"c{i}" for i in range(6)], include=lambda s: s == "tile2_image_part_002"
    )
    assert len(sub) == 1 and np.array_equal(sub[0][1], _labels(2, [0, 1, 2, 3, 4, 5, 255]))


def test_folder_reader_store_layout_with_tiff_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_image(tmp_path / "images" / "a.png", _image(1))
    labels = _labels(1, [0, 300, 7]).astype(np.uint16)
    write_labels(tmp_path / "labels" / "a.tif", labels)
    ds = FolderDataset(tmp_path, [f"c{i}" for i in range(301)], ignore_index=1000)
    assert np.array_equal(ds[0][1], labels)


def test_mask_folder_reader_precedence_and_missing_class(idrid_like):
    ds = MaskFolderDataset(idrid_like, {c: f"masks_{c}" for c in IDRID_CLASSES})
    assert ds.classes == ["background", *IDRID_CLASSES]
    assert ds.stem(0) == "IDRiD_44"
    assert ds.mask_path(0, "soft_exudates") is None and ds.class_mask(0, "soft_exudates") is None
    image, labels = ds[0]
    assert image.shape == (H, W, 3) and labels.shape == (H, W)
    assert labels[45, 70] == 1  # microaneurysm wins over haemorrhage and optic disc
    assert labels[45, 80] == 2  # haemorrhage wins over optic disc
    assert labels[45, 120] == 5 and labels[0, 0] == 0
    assert not (labels == 4).any()  # absent class
    assert (ds[1][1] == 4).any()
    _, masks = ds.binary_masks(0)
    assert set(masks) == set(IDRID_CLASSES) - {"soft_exudates"}
    assert masks["optic_disc"][45, 70]  # raw masks keep the overlapped pixels
    # other precedence: the optic disc covers the lesions inside it
    ds2 = MaskFolderDataset(
        idrid_like, {c: f"masks_{c}" for c in IDRID_CLASSES}, precedence=IDRID_CLASSES[::-1]
    )
    assert ds2[0][1][45, 80] == 5


# --- registry --------------------------------------------------------------------------------


def test_registry_camvid_splits_and_palette(camvid_like):
    train, val = (
        load_dataset("camvid", "train", root=camvid_like),
        load_dataset("camvid", "val", root=camvid_like),
    )
    assert (len(train), len(val), len(load_dataset("camvid", "all", root=camvid_like))) == (3, 2, 5)
    assert train.classes[0] == "Sky" and len(train.classes) == 11
    assert train.palette == (np.arange(33).reshape(11, 3) * 7).tolist()  # read from palette11.png
    labels = val[0][1]
    assert 255 in labels and 11 not in labels


def test_registry_dubai_and_idrid_splits(dubai_like, idrid_like):
    val = load_dataset("dubai", "val", root=dubai_like)
    assert [val.stem(i) for i in range(len(val))] == ["tile1_image_part_009", "tile2_image_part_009"]
    assert len(load_dataset("dubai", "train", root=dubai_like)) == 4
    assert load_dataset("dubai", "val", root=dubai_like).classes[5] == "water"
    iv, it = load_dataset("idrid", "val", root=idrid_like), load_dataset("idrid", "train", root=idrid_like)
    assert [iv.stem(0), it.stem(0), len(iv), len(it)] == ["IDRiD_45", "IDRiD_44", 1, 1]
    with pytest.raises(FineMaskError, match="unknown dataset"):
        load_dataset("nope", "train", root=dubai_like)
    with pytest.raises(FineMaskError, match="no split"):
        load_dataset("dubai", "test", root=dubai_like)


# --- DSRL pairs ------------------------------------------------------------------------------


def _base(tmp_path, n=2, h=H, w=W):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(n):
        write_image(tmp_path / "images" / f"{i}.png", _image(i, h, w))
        write_labels(tmp_path / "labels" / f"{i}.png", _labels(i, [0, 1, 2, 255], h, w))
    return FolderDataset(tmp_path, ["a", "b", "c"])


def test_dsrl_pair_shapes_and_lr_derivation(tmp_path):
    pairs = DSRLPairs(_base(tmp_path), DSRLPairConfig(crop_size=(48, 64), scale_range=(0.8, 1.2)))
    lr, hr, label = pairs[0]
    assert lr.shape == (3, 24, 32) and hr.shape == (3, 48, 64) and label.shape == (48, 64)
    assert lr.dtype == hr.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(lr, downscale_by_2(hr))  # LR is derived from the (jittered) HR
    assert set(label.unique().tolist()) <= {0, 1, 2, 255}


def test_dsrl_pairs_deterministic_per_seed_epoch_index(tmp_path):
    cfg = DSRLPairConfig(crop_size=(48, 64), seed=5)
    a, b = DSRLPairs(_base(tmp_path), cfg), DSRLPairs(FolderDataset(tmp_path, ["a", "b", "c"]), cfg)
    for x, y in zip(a[1], b[1], strict=True):
        assert torch.equal(x, y)
    a.set_epoch(1)
    assert not torch.equal(a[1][1], b[1][1])  # another epoch, another sample
    b.set_epoch(1)
    assert torch.equal(a[1][1], b[1][1])


def test_dsrl_small_scaled_image_is_padded_with_ignore(tmp_path):
    pairs = DSRLPairs(_base(tmp_path), DSRLPairConfig(crop_size=(96, 160), scale_range=(0.5, 0.5)))
    lr, hr, label = pairs[0]
    assert hr.shape == (3, 96, 160) and lr.shape == (3, 48, 80)
    valid = label != 255
    assert 0 < valid.float().mean() < 0.5  # scaled image (45x75) is about a quarter of the crop
    rows, cols = valid.any(1).nonzero(), valid.any(0).nonzero()
    assert len(rows) <= 45 and len(cols) <= 75
    assert hr[:, ~valid.any(1)].abs().sum() == 0  # padding rows are zero


def test_dsrl_validation_is_the_full_image(tmp_path):
    base = _base(tmp_path)
    lr, hr, label = DSRLPairs(base, train=False)[1]
    image, labels = base[1]
    assert hr.shape == (3, H, W) and lr.shape == (3, H // 2, W // 2)
    assert torch.equal(label, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(hr, torch.from_numpy(image).permute(2, 0, 1))


def test_dsrl_validation_pads_odd_sizes(tmp_path):
    lr, hr, label = DSRLPairs(_base(tmp_path, h=45, w=77), train=False)[0]
    assert hr.shape == (3, 46, 78) and lr.shape == (3, 23, 39)
    assert (label[45] == 255).all() and (label[:, 77] == 255).all()


def test_dsrl_crop_must_be_multiple_of_pad(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        DSRLPairs(_base(tmp_path), DSRLPairConfig(crop_size=(48, 60), pad_multiple=8))


def test_cached_dataset_matches_base_and_rescales(tmp_path):
    base = _base(tmp_path)
    cached = CachedDataset(base)
    cached.preload()
    for (ia, la), (ib, lb) in zip([cached[0], cached[1]], [base[0], base[1]], strict=True):
        assert np.abs(ia - ib).max() <= 0.5 / 255 + 1e-6 and np.array_equal(la, lb)
    half = CachedDataset(base, scale=0.5)
    image, labels = half[0]
    assert image.shape == (45, 75, 3) and np.array_equal(labels, resize_labels(base[0][1], (45, 75)))


# --- refinement crops ------------------------------------------------------------------------


@pytest.fixture
def composite_source(tmp_path) -> AlphaCompositeSource:
    folder = tmp_path / "alpha"
    folder.mkdir()
    yy, xx = np.mgrid[:300, :260]
    dist = np.sqrt((yy - 150) ** 2 + (xx - 120) ** 2)
    alpha = np.clip((90 - dist) * 40 + 128, 0, 255).astype(np.uint8)  # soft-edged disk
    Image.fromarray(alpha).save(folder / "GT01.png")
    pictures = []
    for i in range(3):
        Image.fromarray(_image(50 + i, 200, 320)).save(folder / f"pic{i}.jpg")
        pictures.append(folder / f"pic{i}.jpg")
    return AlphaCompositeSource([folder / "GT01.png"], pictures)


def test_refine_crops_shapes_boundary_and_coarse_iou(tmp_path, idrid_like, composite_source):
    sources = [
        ClassMaskSource(_base(tmp_path)),
        ClassMaskSource(MaskFolderDataset(idrid_like, {c: f"masks_{c}" for c in IDRID_CLASSES})),
        composite_source,
    ]
    crops = RefineCrops(sources, length=18, config=RefineCropConfig(scale_range=(0.5, 1.0)))
    for i in range(len(crops)):
        image, gt, coarse = crops[i]
        assert image.shape == (3, 224, 224) and gt.shape == coarse.shape == (1, 224, 224)
        assert image.dtype == gt.dtype == coarse.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert set(gt.unique().tolist()) == {0.0, 1.0}  # both classes: the crop holds a boundary
        assert set(coarse.unique().tolist()) <= {0.0, 1.0}
        assert 0.8 <= mask_iou(coarse[0].numpy() > 0.5, gt[0].numpy() > 0.5) <= 1.0


def test_coarse_for_mixes_in_low_resolution_masks_only_when_asked(idrid_like):
    gt = MaskFolderDataset(idrid_like, {c: f"masks_{c}" for c in IDRID_CLASSES}).class_mask(0, "optic_disc")
    plain = RefineCropConfig()
    # lowres_prob 0 draws nothing extra: the coarse masks are CascadePSP's, sample for sample
    assert np.array_equal(coarse_for(gt, np.random.default_rng(3), plain),
                          perturb_mask(gt, np.random.default_rng(3), plain.perturb))
    only_lowres = RefineCropConfig(lowres_prob=1.0, lowres_factors=(4.0, 4.0))
    assert np.array_equal(coarse_for(gt, np.random.default_rng(3), only_lowres), lowres_mask(gt, 4.0))
    half = RefineCropConfig(lowres_prob=0.5, lowres_factors=(4.0, 4.0))
    kinds = [np.array_equal(coarse_for(gt, np.random.default_rng(s), half), lowres_mask(gt, 4.0)) for s in range(20)]
    assert 3 <= sum(kinds) <= 17


@pytest.mark.parametrize("bad", [{"lowres_prob": 1.5}, {"lowres_prob": -0.1}, {"lowres_factors": (0.5, 4.0)},
                                 {"lowres_factors": (8.0, 2.0)}])
def test_refine_crop_config_rejects_impossible_lowres_settings(bad):
    with pytest.raises(FineMaskError, match="lowres_"):
        RefineCropConfig(**bad)


def test_refine_crops_deterministic_and_use_every_source(tmp_path, composite_source):
    a = RefineCrops([ClassMaskSource(_base(tmp_path)), composite_source], length=8)
    b = RefineCrops([ClassMaskSource(FolderDataset(tmp_path, ["a", "b", "c"])), composite_source], length=8)
    for i in (0, 5):
        for x, y in zip(a[i], b[i], strict=True):
            assert torch.equal(x, y)
    a.set_epoch(3)
    assert not torch.equal(a[0][1], b[0][1])

    class Never:
        def sample(self, rng, cfg):
            raise AssertionError("a source with weight 0 was sampled")

    weighted = RefineCrops([Never(), composite_source], weights=[0, 1], length=6)
    assert all(weighted[i][1].sum() > 0 for i in range(6))


def test_mask_folder_cache_keeps_samples_and_its_byte_bound(idrid_like):
    """Cached decodes give the same crops as a cache that holds only the newest item."""
    ds = MaskFolderDataset(idrid_like, {c: f"masks_{c}" for c in IDRID_CLASSES})
    roomy, tight = ClassMaskSource(ds), ClassMaskSource(ds, cache_mb=0)
    cfg = RefineCropConfig(scale_range=(0.5, 1.0))
    for i in range(12):
        a = roomy.sample(np.random.default_rng(i), cfg)
        b = tight.sample(np.random.default_rng(i), cfg)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(tight._decoded.items) == 1
    assert len(roomy._decoded.items) > 2  # the two images and several masks stay decoded
    assert roomy._decoded.bytes == sum(_nbytes(v) for v in roomy._decoded.items.values())


def test_cache_evicts_least_recently_used_beyond_its_bytes():
    loads = []
    cache = _Cache(lambda k: loads.append(k) or np.zeros(100, np.uint8), capacity=10, max_bytes=250)
    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get(key)
    assert loads == ["a", "b", "c", "b"]  # c pushed out b (least recently used), not a
    assert list(cache.items) == ["a", "b"] and cache.bytes == 200


def test_read_u8_matches_read_image_and_reduces_large_jpegs(tmp_path):
    rgb, gray = _image(3, 120, 200), _image(4, 60, 80)[..., 0]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "big.jpg")
    for name in ("rgb.png", "gray.png", "big.jpg"):
        u8 = _read_u8(tmp_path / name)
        assert u8.dtype == np.uint8 and u8.ndim == 3
        assert np.array_equal(u8.astype(np.float32) / 255.0, read_image(tmp_path / name))
    # the smallest DCT scale that keeps the longer side (200 px) at least max_side
    assert _read_u8(tmp_path / "big.jpg", max_side=50).shape == (30, 50, 3)  # 1/4
    assert _read_u8(tmp_path / "big.jpg", max_side=60).shape == (60, 100, 3)  # 1/2
    with pytest.raises(FineMaskError, match="broken.jpg"):
        (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
        _read_u8(tmp_path / "broken.jpg", max_side=50)


def test_composite_blends_two_pictures_with_the_matte(composite_source):
    rng = np.random.default_rng(0)
    image, gt = composite_source.sample(rng, RefineCropConfig())
    assert image.shape == (224, 224, 3) and gt.shape == (224, 224)
    assert gt.any() and not gt.all()
    assert image.min() >= 0 and image.max() <= 1


@pytest.mark.skipif(
    not Path(os.environ.get("FINEMASK_DATA", "/work/shared/data"), "camvid").is_dir(), reason="no data"
)
def test_real_camvid_registry():
    root = Path(os.environ.get("FINEMASK_DATA", "/work/shared/data"))
    train, val = (
        load_dataset("camvid", "train", root=root / "camvid"),
        load_dataset("camvid", "val", root=root / "camvid"),
    )
    assert (len(train), len(val)) == (367, 101)
    assert train.palette[0] == [128, 128, 128] and train.palette[10] == [0, 128, 192]
    lr, hr, label = DSRLPairs(val, train=False)[0]
    assert lr.shape == (3, 180, 240) and hr.shape == (3, 360, 480) and label.shape == (360, 480)
