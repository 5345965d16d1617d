"""engine.io: every supported layout reads to float RGB; every bad file gets a FineMaskError naming it."""
from __future__ import annotations

import os
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from engine.errors import FineMaskError
from engine.io import image_from_array, image_shape, read_image, read_labels, write_image, write_labels

RNG = np.random.default_rng(0)


def _rgb8(h=7, w=11):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["gray", "rgb", "rgba", "chw", "gray1"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_layouts_read_to_float_rgb(tmp_path, layout, dtype):
    hi = np.iinfo(dtype).max
    rgb = RNG.integers(0, hi + 1, size=(7, 11, 3)).astype(dtype)
    arr = {
        "gray": rgb[..., 0],
        "gray1": rgb[..., :1],
        "rgb": rgb,
        "rgba": np.concatenate([rgb, np.full((7, 11, 1), hi, dtype)], axis=-1),
        "chw": np.moveaxis(rgb, -1, 0),
    }[layout]
    path = tmp_path / "im.tif"
    kwargs = {"photometric": "rgb", "planarconfig": "separate"} if layout == "chw" else {}
    tifffile.imwrite(path, arr, **kwargs)
    out = read_image(path)
    assert out.shape == (7, 11, 3) and out.dtype == np.float32
    expected = rgb[..., :1].repeat(3, -1) if layout.startswith("gray") else rgb
    np.testing.assert_allclose(out, expected / hi, atol=1e-6)


def test_png_jpeg_and_16bit_png(tmp_path):
    rgb = _rgb8()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), rgb / 255, atol=1e-6)
    smooth = np.stack([*np.meshgrid(np.arange(32), np.arange(24)), np.full((24, 32), 16)], -1)
    smooth = (smooth * 6).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "a.jpg") - smooth / 255).max() < 0.05
    g16 = RNG.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(read_image(tmp_path / "g16.png")[..., 1], g16 / 65535, atol=1e-6)


def test_multipage_tiff_takes_first_page_with_warning(tmp_path):
    pages = RNG.integers(0, 256, size=(3, 6, 5), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tw:
        for p in pages:
            tw.write(p)
    with pytest.warns(UserWarning, match="first page"):
        out = read_image(path)
    np.testing.assert_allclose(out[..., 0], pages[0] / 255, atol=1e-6)


def _bad_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    good = tmp_path / "good.png"
    Image.fromarray(_rgb8(64, 64)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    tifffile.imwrite(tmp_path / "int32.tif", np.zeros((4, 4), np.int32))
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((6, 6, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    tifffile.imwrite(tmp_path / "nan.tif", np.full((4, 4), np.nan, np.float32))
    (tmp_path / "notes.bmp").write_bytes(b"BM....")
    return {
        "missing.png": "not found",
        "empty.png": "empty",
        "text.png": "not a readable image",
        "truncated.png": "corrupt or truncated",
        "int32.tif": "unsupported pixel type",
        "five.tif": "channel count",
        "nan.tif": "NaN",
        "notes.bmp": "unsupported file type",
    }


def test_bad_image_files_name_file_and_problem(tmp_path):
    for name, problem in _bad_files(tmp_path).items():
        with pytest.raises(FineMaskError, match=problem) as info:
            read_image(tmp_path / name)
        assert info.value.path == tmp_path / name
        assert name in str(info.value)


def test_pixel_limit_checked_from_header_before_decoding(tmp_path, monkeypatch):
    # A 20000 x 20000 PNG header with no pixel data: rejected from the header alone.
    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR checksum
    path.write_bytes(bytes(data))
    with pytest.raises(FineMaskError, match="more than the limit"):
        read_image(path)
    Image.fromarray(_rgb8(30, 40)).save(tmp_path / "small.png")
    with pytest.raises(FineMaskError, match="more than the limit of 1,000"):
        read_image(tmp_path / "small.png", max_pixels=1000)
    monkeypatch.setenv("FINEMASK_MAX_PIXELS", "500")
    with pytest.raises(FineMaskError, match="limit of 500"):
        read_image(tmp_path / "small.png")


def test_zero_size_arrays_rejected():
    with pytest.raises(FineMaskError, match="size|2-D"):
        image_from_array(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(FineMaskError, match=r"\[0, 1\]"):
        image_from_array(np.full((2, 2), 3.0))


@pytest.mark.parametrize("suffix", [".tif", ".png"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_labels_round_trip(tmp_path, suffix, dtype):
    top = 255 if suffix == ".png" else np.iinfo(dtype).max
    labels = RNG.integers(0, top + 1, size=(9, 13)).astype(dtype)
    path = write_labels(tmp_path / f"l{suffix}", labels, palette=[[1, 2, 3]])
    back = read_labels(path, shape=(9, 13))
    np.testing.assert_array_equal(back, labels)
    if suffix == ".png":
        assert Image.open(path).mode == "P" and Image.open(path).getpalette()[:3] == [1, 2, 3]
    else:
        assert tifffile.TiffFile(path).pages[0].compression == 8  # zlib / deflate


def test_label_errors(tmp_path):
    labels = np.zeros((4, 5), np.uint8)
    write_labels(tmp_path / "l.tif", labels)
    with pytest.raises(FineMaskError, match="does not match the image"):
        read_labels(tmp_path / "l.tif", shape=(5, 4))
    with pytest.raises(FineMaskError, match="up to 255"):
        write_labels(tmp_path / "big.png", np.full((2, 2), 300, np.uint16))
    Image.fromarray(_rgb8()).save(tmp_path / "colour.png")
    with pytest.raises(FineMaskError, match="palette or gray"):
        read_labels(tmp_path / "colour.png")
    with pytest.raises(FineMaskError, match="class ids"):
        write_labels(tmp_path / "neg.tif", np.full((2, 2), -1, np.int32))
    assert not (tmp_path / "big.png").exists() and not (tmp_path / "neg.tif").exists()


def test_failed_write_leaves_earlier_file_intact(tmp_path, monkeypatch):
    path = write_labels(tmp_path / "l.tif", np.ones((4, 4), np.uint8))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(RuntimeError):
        write_labels(path, np.zeros((4, 4), np.uint8))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["l.tif"]  # no temp file left behind


def test_write_image_round_trip(tmp_path):
    rgb = _rgb8()
    np.testing.assert_allclose(read_image(write_image(tmp_path / "a.png", rgb)), rgb / 255, atol=1e-6)
    g16 = RNG.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(write_image(tmp_path / "a.tif", g16))
    np.testing.assert_allclose(out[..., 2], g16 / 65535, atol=1e-6)


def test_image_shape_from_header(tmp_path):
    Image.fromarray(_rgb8(30, 40)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((3, 20, 50), np.uint16), photometric="rgb", planarconfig="separate")
    assert image_shape(tmp_path / "a.png") == (30, 40)
    assert image_shape(tmp_path / "b.tif") == (20, 50)
    with pytest.raises(FineMaskError, match="limit"):
        image_shape(tmp_path / "a.png", max_pixels=100)
