"""Bad image and label files at the engine: engine.io and the annotation store.

Properties (each over many generated files, see bad_files.py):
- read_image / read_labels / image_shape refuse a bad file with a FineMaskError naming the file
  and the problem; damage a format cannot detect may only ever read as the undamaged file did;
  no other exception escapes; nothing is written next to the file.
- Store.add / Store.update refuse bad files, labels of the wrong size and class ids the store has
  no name for, and the store stays byte-identical.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bad_files import (
    BadFile,
    bad_image_files,
    bad_label_files,
    bomb_files,
    empty_files,
    encode,
    jpeg_bomb,
    label_file,
    labels_beyond,
    other_shapes,
    png_bomb,
    tiff_bomb,
    valid_label_files,
    wrong_magic_files,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine.errors import FineMaskError
from engine.io import image_shape, read_image, read_labels, write_image
from engine.store import Store

#: Pixel limit in force for these tests: small, so damaged headers never decode much.
LIMIT = 64 * 64 * 16
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@pytest.fixture(autouse=True)
def _small_pixel_limit(monkeypatch):
    monkeypatch.setenv("FINEMASK_MAX_PIXELS", str(LIMIT))


def fresh_folder(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


def listing(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_names_file_and_problem(exc: FineMaskError, path: Path, problem: str | None) -> None:
    text = str(exc)
    assert path.name in text, f"error does not name the file: {text}"
    assert "\n" not in text, f"error is not one line: {text!r}"
    if problem:
        assert re.search(problem, text), f"error does not state the problem /{problem}/: {text}"


def check_read(read, bad: BadFile, folder: Path, well_formed) -> str:
    """Read ``bad`` with ``read``; assert the contract; return the outcome (for statistics)."""
    path = bad.write(folder)
    before = listing(folder)
    try:
        out = read(path)
    except FineMaskError as exc:
        assert_names_file_and_problem(exc, path, bad.problem)
        outcome = "refused"
    else:
        assert bad.problem is None, f"{bad} was read but must be refused (/{bad.problem}/)"
        well_formed(out)
        if bad.original is not None and not bad.may_read:
            reference = Path(folder) / f"original{path.suffix}"
            reference.write_bytes(bad.original)
            np.testing.assert_array_equal(out, read(reference), err_msg=f"{bad} read as something else")
            reference.unlink()
        outcome = "read as the original" if not bad.may_read else "read (undetectable damage)"
    assert listing(folder) == before, "reading wrote files"
    event(f"{bad.kind}: {outcome}")
    return outcome


def well_formed_image(out: np.ndarray) -> None:
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[0] * out.shape[1] <= LIMIT and np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def well_formed_labels(out: np.ndarray) -> None:
    assert out.dtype in (np.uint8, np.uint16) and out.ndim == 2 and out.size <= LIMIT


# --- engine.io -----------------------------------------------------------------------------------


def planar(shape, config):
    return encode(np.zeros(shape, np.uint8), "tif", photometric="minisblack", planarconfig=config)


@settings(max_examples=200, **SETTINGS)
@given(bad=bad_image_files(LIMIT))
# regressions: a JPEG named .png was read (Pillow guesses the format); a PNG named .tif was called
# "corrupt or truncated"; 5-channel TIFFs of 3 rows or 3 columns were read as 3-channel images of
# another shape (the channel-first guess), and a planar one was said to have 9 channels
@example(bad=BadFile("jpeg.png", encode(np.zeros((8, 8, 3), np.uint8), "jpg"), "wrong magic bytes",
                     "jpeg content named .png", problem="holds JPEG data.*wrong file extension"))
@example(bad=BadFile("png.tif", encode(np.zeros((8, 8), np.uint8), "png"), "wrong magic bytes",
                     "png content named .tif", problem="holds PNG data.*wrong file extension"))
@example(bad=BadFile("planar.tif", planar((5, 9, 3), "separate"), "channel count", "5 planar channels, 9x3",
                     problem="channel count 5"))
@example(bad=BadFile("contig.tif", planar((3, 9, 5), "contig"), "channel count", "5 channels, 3x9",
                     problem="channel count 5"))
@example(bad=BadFile("huge.png", png_bomb(100_000, 100_000), "decompression bomb", "100000 x 100000 PNG",
                     problem="10,000,000,000 pixels, more than the limit"))
@example(bad=BadFile("huge.jpg", jpeg_bomb(65535, 65535), "decompression bomb", "65535 x 65535 JPEG",
                     problem="more than the limit"))
def test_read_image_refuses_bad_files(tmp_path, bad):
    check_read(lambda p: read_image(p, max_pixels=LIMIT), bad, fresh_folder(tmp_path), well_formed_image)


@settings(max_examples=100, **SETTINGS)
@given(bad=st.one_of(bomb_files(LIMIT, "image"), wrong_magic_files("image"), empty_files("image"),
                     bad_image_files(LIMIT)))
@example(bad=BadFile("huge.tif", tiff_bomb(100_000, 100_000), "decompression bomb", "100000 x 100000 TIFF",
                     problem="more than the limit"))
def test_image_shape_checks_the_header_like_read_image(tmp_path, bad):
    """Header flaws are refused from the header alone; a shape it gives is the one read_image finds."""
    header_flaw = re.search("empty|wrong file extension|not a readable image|more than the limit", bad.problem or "")

    def shape_then_image(path):
        shape = image_shape(path, max_pixels=LIMIT)
        assert len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape) and shape[0] * shape[1] <= LIMIT
        assert not header_flaw, f"{bad}: image_shape gave {shape} for a file refused from its header"
        image = read_image(path, max_pixels=LIMIT)  # data flaws: its FineMaskError states them
        assert image.shape[:2] == shape, f"image_shape {shape} but read_image {image.shape[:2]}"
        return image

    check_read(shape_then_image, bad, fresh_folder(tmp_path), well_formed_image)


@settings(max_examples=150, **SETTINGS)
@given(bad=bad_label_files(LIMIT))
@example(bad=BadFile("lossy.png", encode(np.zeros((8, 8), np.uint8), "jpg"), "wrong magic bytes",
                     "grey JPEG named .png", problem="holds JPEG data"))  # was read as labels: lossy class ids
def test_read_labels_refuses_bad_files(tmp_path, bad):
    check_read(lambda p: read_labels(p, max_pixels=LIMIT), bad, fresh_folder(tmp_path), well_formed_labels)


@settings(max_examples=40, **SETTINGS)
@given(good=valid_label_files(), data=st.data())
def test_read_labels_refuses_another_shape(tmp_path, good, data):
    fmt, content = good
    folder = fresh_folder(tmp_path)
    path = folder / f"labels.{fmt}"
    path.write_bytes(content)
    actual = read_labels(path).shape
    other = data.draw(other_shapes(actual))
    with pytest.raises(FineMaskError) as info:
        read_labels(path, shape=other)
    assert_names_file_and_problem(info.value, path, rf"{actual[0]}x{actual[1]}.*does not match.*{other[0]}x{other[1]}")


@settings(max_examples=30, **SETTINGS)
@given(labels=st.integers(1, 40).flatmap(lambda n: labels_beyond(n, (7, 9))), fmt=st.sampled_from(["tif", "png"]))
def test_read_labels_alone_accepts_any_class_id(tmp_path, labels, fmt):
    """engine.io knows no class list: any uint8/uint16 id reads back unchanged (PNG: up to 255)."""
    if fmt == "png":
        labels = (labels % 255).astype(np.uint8)  # a palette PNG holds ids up to 254 here
    path = fresh_folder(tmp_path) / f"ids.{fmt}"
    path.write_bytes(label_file(labels, fmt))
    np.testing.assert_array_equal(read_labels(path, shape=(7, 9)), labels)


@pytest.mark.parametrize("compression", ["tiff_lzw", "jpeg"])
def test_compressed_tiffs_read(tmp_path, compression):
    """LZW and JPEG TIFFs are common; imagecodecs (a dependency) decodes them. Without it the
    error says what to install instead of calling the file corrupt (engine.io._read_tiff)."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    path = tmp_path / f"{compression}.tif"
    Image.fromarray(rgb).save(path, compression=compression)
    out = read_image(path)
    assert out.shape == (20, 30, 3)
    if compression == "tiff_lzw":  # lossless
        np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), rgb)


def test_label_tiff_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    import tifffile

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded a page over the pixel limit")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    path = tmp_path / "bomb.tif"
    path.write_bytes(tiff_bomb(100_000, 100_000))
    for read in (read_labels, read_image, image_shape):
        with pytest.raises(FineMaskError, match="more than the limit") as info:
            read(path)
        assert info.value.path == path


# --- the annotation store ------------------------------------------------------------------------

SHAPE = (12, 16)
NAMES = ["sky", "road", "car"]


def make_store(folder: Path) -> tuple[Store, Path]:
    """A store naming 3 classes and holding one pair "first"; and a good image file of SHAPE."""
    s = Store.open(folder / "store")
    s.set_class_names(NAMES)
    image = write_image(folder / "good.png", np.random.default_rng(0).integers(0, 256, (*SHAPE, 3), np.uint8))
    s.add(image, np.zeros(SHAPE, np.uint8), "predicted", name="first")
    return s, image


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path)


def assert_store_refuses(store: Store, call, path: Path, problem: str | None) -> None:
    before = listing(store.root)
    with pytest.raises(FineMaskError) as info:
        call()
    assert_names_file_and_problem(info.value, path, problem)
    assert listing(store.root) == before, "a refused change altered the store"
    assert store.ids() == ["first"] and not store.problems


@settings(max_examples=50, **SETTINGS)
@given(bad=bad_image_files(LIMIT))
def test_store_add_refuses_bad_images(tmp_path, bad):
    folder = fresh_folder(tmp_path)
    s, _ = make_store(folder)
    path = bad.write(folder)
    try:  # damage a format cannot see may leave a readable image: give it labels of its size
        shape = read_image(path).shape[:2]
    except FineMaskError:
        shape = SHAPE
    before = listing(s.root)
    try:
        s.add(path, np.zeros(shape, np.uint8), "corrected", name="new")
    except FineMaskError as exc:
        assert_names_file_and_problem(exc, path, bad.problem)
        assert listing(s.root) == before, "a refused add altered the store"
        event(f"{bad.kind}: refused")
    else:
        assert bad.problem is None, f"{bad} was added"
        np.testing.assert_array_equal(s.load("new")[0], read_image(path))
        event(f"{bad.kind}: added (the damage left a readable image)")


@settings(max_examples=60, **SETTINGS)
@given(bad=bad_label_files(LIMIT))
def test_store_add_and_update_refuse_bad_label_files(tmp_path, store, bad):
    s, image = store
    path = bad.write(fresh_folder(tmp_path))
    try:  # damage a format cannot see may, rarely, leave a readable label map of the image's size
        read_labels(path, shape=SHAPE)
        event(f"{bad.kind}: readable at the image's size")
        return
    except FineMaskError:
        pass
    for call in (lambda: s.add(image, path, "corrected", name="new"), lambda: s.update("first", path)):
        assert_store_refuses(s, call, path, bad.problem)
    event(f"{bad.kind}: refused")


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), fmt=st.sampled_from(["tif", "png"]), as_array=st.booleans())
def test_store_refuses_labels_of_another_size(tmp_path, store, data, fmt, as_array):
    s, image = store
    shape = data.draw(other_shapes(SHAPE))
    labels = np.zeros(shape, np.uint8)
    if as_array:
        assert_store_refuses(s, lambda: s.add(image, labels, "corrected", name="new"), image, "but the image is 12x16")
        assert_store_refuses(s, lambda: s.update("first", labels), s.get("first").image_path, "but the image is 12x16")
        return
    path = fresh_folder(tmp_path) / f"labels.{fmt}"
    path.write_bytes(label_file(labels, fmt))
    assert_store_refuses(s, lambda: s.add(image, path, "corrected", name="new"), path, "does not match the image 12x16")
    assert_store_refuses(s, lambda: s.update("first", path), path, "does not match the image 12x16")


@settings(max_examples=40, **SETTINGS)
@given(labels=labels_beyond(len(NAMES), SHAPE), fmt=st.sampled_from(["tif", "png"]), as_array=st.booleans())
@example(labels=np.full(SHAPE, 3, np.uint8), fmt="tif", as_array=False)  # was stored: an id with no name
def test_store_refuses_class_ids_it_has_no_name_for(tmp_path, store, labels, fmt, as_array):
    s, image = store
    if fmt == "png" and labels.max() > 255:
        fmt = "tif"
    if as_array:
        source, named = labels, image
    else:
        source = named = fresh_folder(tmp_path) / f"labels.{fmt}"
        named.write_bytes(label_file(labels, fmt))
    bad = int(min(v for v in np.unique(labels) if v >= len(NAMES) and v != 255))
    problem = rf"class id\(s\) {bad}\b.*no name in this store: it names 3 classes"
    assert_store_refuses(s, lambda: s.add(image, source, "corrected", name="new"), named, problem)
    assert_store_refuses(s, lambda: s.update("first", source), s.get("first").image_path if as_array else named,
                         problem)


def test_store_accepts_named_ids_and_unlabelled_255(store):
    s, image = store
    labels = np.array([[0, 1, 2, 255] * 4] * SHAPE[0], np.uint8)
    pid = s.add(image, labels, "corrected", name="ok")
    assert s.get(pid).classes == (0, 1, 2, 255)
    s.update("first", labels)
    np.testing.assert_array_equal(s.load("first")[1], labels)


def test_store_without_class_names_takes_any_id(tmp_path):
    s = Store.open(tmp_path / "open")
    image = write_image(tmp_path / "im.png", np.zeros((*SHAPE, 3), np.uint8))
    labels = np.full(SHAPE, 4000, np.uint16)
    pid = s.add(image, labels, "corrected")
    np.testing.assert_array_equal(s.load(pid)[1], labels)


def test_class_names_must_cover_the_ids_already_stored(store):
    s, image = store
    s.add(image, np.full(SHAPE, 2, np.uint8), "corrected", name="second")
    before = listing(s.root)
    with pytest.raises(FineMaskError, match=r"manifest.json: class id\(s\) 2 have no name in this store: it names 2"):
        s.set_class_names(["sky", "road"])  # was accepted: pair "second" would hold a class without a name
    assert listing(s.root) == before and s.class_names == NAMES
    s.set_class_names([*NAMES, "bike"])
    assert s.class_names == [*NAMES, "bike"]
