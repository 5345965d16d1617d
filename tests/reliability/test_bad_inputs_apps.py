"""Bad image and label files at the front ends: the CLI, the napari reader, the web session.

Properties:
- CLI (``app.cli.main`` in-process): ``finemask segment`` / ``refine`` / ``store add`` exit with 2,
  stderr's last line is ``finemask <command>: error: <file>: <problem>``, no traceback, and no
  output file (no new store, an existing store byte-identical).
- napari reader: ``get_reader`` never raises and never claims a file outside a store unless it
  is a readable FineMask label file; a claimed bad file (inside a store) gives a FineMaskError
  naming it, which napari shows as the reader's error; a TIFF bomb is not decoded to look at it.
- web session: ``Workbench.open_image`` / ``set_labels`` raise FineMaskError naming the file
  (the server shows it with gr.Error); nothing is written; labels with ids beyond the model's
  classes are shown but a save is refused with the store untouched.
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
    encode,
    label_file,
    labels_beyond,
    other_shapes,
    tiff_bomb,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine.errors import FineMaskError
from engine.io import read_image, read_labels, write_image, write_labels
from engine.store import Store

LIMIT = 64 * 64 * 16
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
SHAPE = (24, 32)
CLASSES = 3


@pytest.fixture(autouse=True)
def _small_pixel_limit(monkeypatch):
    monkeypatch.setenv("FINEMASK_MAX_PIXELS", str(LIMIT))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(segmenter folder, refiner folder): tiny random models, 3 classes."""
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "seg", CLASSES, (32, 24), "tiny"), make_tiny_refiner(root / "ref")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good image (SHAPE) and its good labels, in a folder of their own."""
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    image = write_image(folder / "scene.png", rng.integers(0, 256, (*SHAPE, 3), np.uint8))
    labels = write_labels(folder / "scene_labels.png", rng.integers(0, CLASSES, SHAPE).astype(np.uint8))
    return image, labels


def fresh_folder(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def labels_at(shape):
    return lambda path: read_labels(path, shape=shape)


def readable(bad: BadFile, path: Path, reader=read_image) -> bool:
    """Whether damage left the file readable (possible only where ``bad`` allows it)."""
    if bad.problem is not None:
        return False
    try:
        reader(path)
    except FineMaskError:
        return False
    return True


# --- the command line ----------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    from app.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, path: Path, problem: str | None) -> None:
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, f"not one line: {err!r}"
    last = err.strip()
    assert last.startswith(f"finemask {command}: error: ") and path.name in last, last
    if problem:
        assert re.search(problem, last), f"/{problem}/ not in {last}"


@settings(max_examples=40, **SETTINGS)
@given(bad=bad_image_files(LIMIT))
@example(bad=BadFile("huge.tif", tiff_bomb(100_000, 100_000), "decompression bomb", "100000 x 100000 TIFF",
                     problem="more than the limit"))
def test_cli_segment_refuses_bad_images(tmp_path, capsys, models, bad):
    folder = fresh_folder(tmp_path)
    path = bad.write(folder)
    out = folder / "out" / "labels.tif"
    if readable(bad, path):
        event(f"{bad.kind}: damage left it readable (no CLI run)")
        return
    before = listing(folder)
    code, err = run_cli(capsys, "segment", str(path), "-o", str(out), "--model", str(models[0]))
    assert_one_line_error(code, err, "segment", path, bad.problem)
    assert listing(folder) == before and not out.parent.exists()
    event(f"{bad.kind}: exit 2")


@settings(max_examples=40, **SETTINGS)
@given(bad=st.one_of(bad_image_files(LIMIT).map(lambda b: ("image", b)),
                     bad_label_files(LIMIT).map(lambda b: ("mask", b))))
def test_cli_refine_refuses_bad_images_and_masks(tmp_path, capsys, models, good, bad):
    role, bad = bad
    folder = fresh_folder(tmp_path)
    path = bad.write(folder)
    if readable(bad, path, read_image if role == "image" else labels_at(SHAPE)):
        event(f"{role} {bad.kind}: readable")
        return
    image, mask = (path, good[1]) if role == "image" else (good[0], path)
    out = folder / "refined.png"
    before = listing(folder)
    code, err = run_cli(capsys, "refine", str(image), str(mask), "-o", str(out), "--model", str(models[1]))
    assert_one_line_error(code, err, "refine", path, bad.problem)
    assert listing(folder) == before
    event(f"{role} {bad.kind}: exit 2")


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), fmt=st.sampled_from(["tif", "png"]))
def test_cli_refine_refuses_a_mask_of_another_size(tmp_path, capsys, models, good, data, fmt):
    folder = fresh_folder(tmp_path)
    shape = data.draw(other_shapes(SHAPE))
    mask = folder / f"mask.{fmt}"
    mask.write_bytes(label_file(np.zeros(shape, np.uint8), fmt))
    out = folder / "refined.tif"
    code, err = run_cli(capsys, "refine", str(good[0]), str(mask), "-o", str(out), "--model", str(models[1]))
    assert_one_line_error(code, err, "refine", mask, f"does not match the image {SHAPE[0]}x{SHAPE[1]}")
    assert not out.exists()


def make_store(folder: Path, good) -> Store:
    store = Store.open(folder / "store")
    store.set_class_names([f"class {i}" for i in range(CLASSES)])
    store.add(good[0], good[1], "corrected", name="first")
    return store


@settings(max_examples=30, **SETTINGS)
@given(bad=st.one_of(bad_image_files(LIMIT).map(lambda b: ("image", b)),
                     bad_label_files(LIMIT).map(lambda b: ("labels", b))),
       new_store=st.booleans())
def test_cli_store_add_refuses_and_leaves_the_store_alone(tmp_path, capsys, good, bad, new_store):
    role, bad = bad
    folder = fresh_folder(tmp_path)
    labels_dir = folder / "labels"
    labels_dir.mkdir()
    if role == "image":
        image = bad.write(folder)
        if readable(bad, image):
            event(f"{role} {bad.kind}: readable")
            return
        (labels_dir / f"{image.stem}.png").write_bytes(good[1].read_bytes())
        named = image
    else:
        image = folder / "pic.png"
        image.write_bytes(good[0].read_bytes())
        named = labels_dir / f"pic{Path(bad.name).suffix}"
        named.write_bytes(bad.data)
        if readable(bad, named, labels_at(SHAPE)):
            event(f"{role} {bad.kind}: readable")
            return
    root = folder / "store"
    if not new_store:
        make_store(folder, good)
    before = listing(root) if root.exists() else None
    code, err = run_cli(capsys, "store", "add", str(root), str(image), "--labels", str(labels_dir))
    assert_one_line_error(code, err, "store", named, bad.problem)
    assert (listing(root) if root.exists() else None) == before, "a refused add changed (or made) the store"
    event(f"{role} {bad.kind}: exit 2, {'no store made' if new_store else 'store unchanged'}")


@settings(max_examples=15, **SETTINGS)
@given(labels=labels_beyond(CLASSES, SHAPE))
def test_cli_store_add_refuses_class_ids_without_a_name(tmp_path, capsys, good, labels):
    folder = fresh_folder(tmp_path)
    store = make_store(folder, good)
    (folder / "labels").mkdir()
    image = folder / "other.png"
    image.write_bytes(good[0].read_bytes())
    named = write_labels(folder / "labels" / "other.tif", labels)
    before = listing(store.root)
    code, err = run_cli(capsys, "store", "add", str(store.root), str(image), "--labels", str(folder / "labels"))
    assert_one_line_error(code, err, "store", named, "no name in this store")
    assert listing(store.root) == before


# --- the napari reader ---------------------------------------------------------------------------


#: Flaws that make a file unreadable as an image and as labels alike.
UNREADABLE_AS_ANYTHING = ("truncated", "header bytes changed", "wrong magic bytes", "0 bytes", "decompression bomb")


def store_folder(folder: Path) -> Path:
    """An (empty) annotation store: what makes the reader claim files in its images/ and labels/."""
    return Store.open(folder / "store").root


@settings(max_examples=80, **SETTINGS)
@given(bad=st.one_of(bad_image_files(LIMIT), bad_label_files(LIMIT)),
       where=st.sampled_from(["loose", "images", "labels"]))
def test_napari_reader_never_raises_from_the_hook_and_names_claimed_bad_files(tmp_path, bad, where):
    from app.napari.reader import get_reader

    folder = fresh_folder(tmp_path)
    target = folder if where == "loose" else store_folder(folder) / where
    path = bad.write(target)
    before = listing(folder)
    reader = get_reader(str(path))  # napari calls this for every file it opens: it must not raise
    if reader is None:
        assert where == "loose" or (where == "labels" and path.suffix in (".jpg", ".jpeg")), "a store file not claimed"
        event(f"{where} {bad.kind}: not claimed")
    else:
        try:
            layers = reader(str(path))
        except FineMaskError as exc:
            assert path.name in str(exc), str(exc)
            if bad.problem and bad.kind in UNREADABLE_AS_ANYTHING:
                assert re.search(bad.problem, str(exc)), str(exc)
            event(f"{where} {bad.kind}: claimed, FineMaskError")
        else:
            # e.g. an RGB PNG is a bad label map but a good image; a 2-D int16 TIFF with few values
            # is a good label map: what no role can read must never come back as a layer
            assert not (bad.problem and bad.kind in UNREADABLE_AS_ANYTHING), f"{bad} was read"
            data, _, kind = layers[0]
            assert data.ndim in (2, 3) and data.size <= 4 * LIMIT and kind in ("image", "labels")
            event(f"{where} {bad.kind}: claimed, read as {kind}")
    assert listing(folder) == before, "the reader wrote files"


def test_napari_reader_does_not_decode_a_tiff_bomb_to_look_at_it(tmp_path, monkeypatch):
    import tifffile

    from app.napari.reader import get_reader

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded a page over the pixel limit")

    path = tmp_path / "bomb.tif"
    path.write_bytes(tiff_bomb(100_000, 100_000))  # 10^10 pixels of uint8 labels, if decoded
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    reader = get_reader(str(path))  # the hook looks at names and headers only
    if reader is not None:
        with pytest.raises(FineMaskError, match="more than the limit"):
            reader(str(path))
    inside = store_folder(tmp_path) / "labels" / "bomb.tif"
    inside.write_bytes(path.read_bytes())
    with pytest.raises(FineMaskError, match="more than the limit") as info:
        get_reader(str(inside))(str(inside))
    assert info.value.path == inside


def test_napari_shows_the_readers_error_for_a_claimed_bad_file(tmp_path):
    """Through npe2, as napari opens files: our FineMaskError reaches napari (which shows it);
    a bad file we do not claim is left to the other readers."""
    npe2 = pytest.importorskip("npe2")
    from npe2 import io_utils

    pm = npe2.PluginManager.instance()
    pm.discover()
    if "finemask" not in pm._manifests:
        pytest.skip("the finemask napari plugin is not installed (pip install -e .)")
    broken = store_folder(tmp_path) / "labels" / "broken.v1.tif"  # a store labels version's name
    broken.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(FineMaskError, match=r"broken\.v1\.tif"):
        io_utils.read([str(broken)], plugin_name="finemask", stack=False)
    loose = tmp_path / "loose.png"  # not a name of ours: FineMask is not even offered for it
    loose.write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "jpg"))
    with pytest.raises(ValueError, match="not a compatible reader"):
        io_utils.read([str(loose)], plugin_name="finemask", stack=False)


# --- the web session -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory, models):
    from app.web.session import WebConfig, Workbench  # no gradio needed: the server only wraps it

    root = tmp_path_factory.mktemp("web")
    config = WebConfig(store=root / "store", max_pixels=LIMIT, examples=[])
    bench = Workbench(config, model=models[0], refiner=models[1])
    yield bench
    bench.close()


def web_state(bench) -> tuple[dict[str, str], dict[str, str]]:
    return listing(bench.outdir), listing(bench.store.root)


@settings(max_examples=60, **SETTINGS)
@given(bad=bad_image_files(LIMIT))
@example(bad=BadFile("dot.png", encode(np.zeros((1, 1, 3), np.uint8), "png"), "1 x 1 pixel", "1 x 1 image",
                     problem="at least 8x8"))
def test_web_open_image_refuses_bad_uploads(tmp_path, bench, bad):
    folder = fresh_folder(tmp_path)
    path = bad.write(folder)
    before = web_state(bench), listing(folder)
    try:
        work = bench.open_image(path)
    except FineMaskError as exc:
        assert exc.path is not None and exc.path.name == path.name and path.name in str(exc)
        if bad.problem:  # the web app checks the size (8 x 8 at least) first
            assert re.search(f"{bad.problem}|needs at least 8x8", str(exc)), str(exc)
        assert (web_state(bench), listing(folder)) == before, "a refused upload left files"
        event(f"{bad.kind}: FineMaskError")
    else:
        assert bad.problem is None, f"{bad} was opened"
        assert work.image.shape[:2] == read_image(path).shape[:2]
        event(f"{bad.kind}: opened (damage left it readable)")


@settings(max_examples=40, **SETTINGS)
@given(bad=bad_label_files(LIMIT))
def test_web_set_labels_refuses_bad_label_files(tmp_path, bench, good, bad):
    work = bench.open_image(good[0])
    path = bad.write(fresh_folder(tmp_path))
    if readable(bad, path, labels_at(SHAPE)):
        event(f"{bad.kind}: readable")
        return
    before = web_state(bench)
    with pytest.raises(FineMaskError) as info:
        bench.set_labels(work, path)
    assert path.name in str(info.value)
    if bad.problem:
        assert re.search(bad.problem, str(info.value)), str(info.value)
    assert work.labels is None and web_state(bench) == before
    event(f"{bad.kind}: FineMaskError")


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), fmt=st.sampled_from(["tif", "png"]))
def test_web_set_labels_refuses_another_size(tmp_path, bench, good, data, fmt):
    work = bench.open_image(good[0])
    path = fresh_folder(tmp_path) / f"labels.{fmt}"
    path.write_bytes(label_file(np.zeros(data.draw(other_shapes(SHAPE)), np.uint8), fmt))
    with pytest.raises(FineMaskError, match=rf"labels\.{fmt}: .*does not match the image {SHAPE[0]}x{SHAPE[1]}"):
        bench.set_labels(work, path)
    assert work.labels is None


@settings(max_examples=15, **SETTINGS)
@given(labels=labels_beyond(CLASSES, SHAPE))
def test_web_shows_labels_beyond_the_models_classes_but_never_stores_them(tmp_path, bench, good, labels):
    """Refinement and display work on any ids (unknown ones are drawn black); the store keeps only
    ids its classes name (255 = unlabelled), and a refused save leaves it untouched: the class
    names it would have taken from the model are not written either."""
    work = bench.open_image(good[0])
    path = write_labels(fresh_folder(tmp_path) / "labels.tif", labels)
    bench.set_labels(work, path)
    np.testing.assert_array_equal(work.labels, labels)
    assert work.summary()["classes"]  # shares per class, unknown ids included, without an error
    before = web_state(bench)
    with pytest.raises(FineMaskError, match="no name in this store"):
        bench.save(work)
    assert web_state(bench) == before and work.pair_id is None
