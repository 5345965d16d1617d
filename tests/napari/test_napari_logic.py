"""UI-free parts of the napari plugin: label mapping, model lists, saving, reader, writer, samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from app.napari import logic, reader, samples, writer
from engine.checkpoints import read_card
from engine.errors import FineMaskError
from engine.store import Store


def test_layer_values_shift_classes_and_keep_unlabelled():
    classes = np.array([[0, 1, 2], [logic.UNLABELLED, 10, 254]], np.uint8)
    values = logic.classes_to_layer(classes)
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values, [[1, 2, 3], [0, 11, 255]])
    np.testing.assert_array_equal(logic.layer_to_classes(values), classes)
    # uint16 / int64 layers (napari's default dtype for hand-drawn layers) map the same way
    np.testing.assert_array_equal(logic.layer_to_classes(values.astype(np.int64)), classes)


def test_layer_values_that_are_no_class_are_refused_by_name():
    values = np.array([[1, 2], [3, 7]], np.int32)
    with pytest.raises(FineMaskError, match="label 7 is not a class.*3 classes"):
        logic.layer_to_classes(values, num_classes=3)
    with pytest.raises(FineMaskError, match="label -1"):
        logic.layer_to_classes(np.array([[-1, 1]]), num_classes=3)


def test_colours_and_features_follow_the_palette():
    colours = logic.label_colours([[255, 0, 0], [0, 128, 255]])
    assert colours[0] == logic.TRANSPARENT
    assert colours[1] == (1.0, 0.0, 0.0, 1.0)
    assert colours[2] == pytest.approx((0.0, 128 / 255, 1.0, 1.0))
    assert colours[None] == logic.UNKNOWN_COLOUR
    features = logic.class_features(["Sky", "Road"])
    assert features == {"index": [0, 1, 2], "class": ["unlabelled", "Sky", "Road"]}


def _fake_version(store_root, name, parent, before, after):
    from training.tiny import make_tiny_segmenter

    folder = make_tiny_segmenter(store_root / "models" / name, name=name)
    card_path = folder / "card.json"
    card = json.loads(card_path.read_text())
    card.update(parent=parent, metrics={"before": before, "after": after})
    card_path.write_text(json.dumps(card))
    return folder


def test_model_list_has_shipped_fine_tuned_and_added_models(tmp_path, tiny_models):
    seg, ref = tiny_models
    Store.open(tmp_path / "store")
    version = _fake_version(tmp_path / "store", "camvid-ft1", "camvid",
                            {"miou": 20.0, "mba": 30.0, "pairs": 2}, {"miou": 25.5, "mba": 31.0, "pairs": 2})
    models = logic.list_models("segmentation", tmp_path / "store", [seg, ref], default="camvid")
    by_origin = {m.origin: m for m in models}
    assert models[0].source == "camvid" and models[0].origin == "shipped"
    # the shipped card stores mIoU as a fraction: shown as a percentage
    shipped_miou = 100 * read_card("camvid").metrics["camvid_val"]["miou"]
    assert f"mIoU {shipped_miou:.1f}" in models[0].label
    assert by_origin["store"].source == str(version)
    assert "fine-tuned" in by_origin["store"].label and "mIoU 20.0 → 25.5" in by_origin["store"].label
    assert by_origin["folder"].source == str(seg)
    assert all(m.task == "segmentation" for m in models)  # the refiner folder is not offered here

    refiners = logic.list_models("refinement", tmp_path / "store", [seg, ref], default="no-such-refiner")
    assert refiners[0].source == "no-such-refiner" and not refiners[0].available
    assert "(not installed)" in refiners[0].label
    assert str(ref) in [m.source for m in refiners]


def test_metric_lines(tiny_models):
    before = {"miou": 40.0, "mba": 50.0, "pairs": 3}
    after = {"miou": 45.25, "mba": 49.5, "pairs": 3}
    assert logic.evaluation_line(before, after) == "mIoU 40.0 → 45.2, mBA 50.0 → 49.5 on 3 validation pairs"
    assert "no validation pairs" in logic.evaluation_line({"pairs": 0}, {"pairs": 0})
    assert "not installed" in logic.metrics_details(None)
    assert "3 classes" in logic.metrics_details(read_card(tiny_models[0]))


def test_missing_default_refiner_gives_a_clear_error(monkeypatch, tmp_path):
    import engine.checkpoints

    monkeypatch.setattr(engine.checkpoints, "ASSETS_MODELS", tmp_path)  # an install without shipped models
    with pytest.raises(FineMaskError, match="refine-light.*not installed"):
        logic.ModelCache().refiner(logic.DEFAULT_REFINER)


def test_parse_loss():
    assert logic.parse_loss("train 12/300 · loss 0.41 · ETA 0:43") == pytest.approx(0.41)
    assert logic.parse_loss("step 3 loss=1.5e-2") == pytest.approx(0.015)
    assert logic.parse_loss("evaluating the base model 1/2") is None


def test_settings_remember_the_store(tmp_path):
    assert logic.load_settings() == {}
    logic.save_settings(store=str(tmp_path / "s"))
    logic.save_settings(other=1)
    assert logic.load_settings() == {"store": str(tmp_path / "s"), "other": 1}
    assert logic.settings_file().parent == tmp_path / "config"


def test_image_for_engine():
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert logic.image_for_engine(rgb, True) is rgb  # no copy of a 4K image
    deep = np.array([[0, 500], [1000, 2000]], np.int32)
    scaled = logic.image_for_engine(deep, False, (0, 1000))
    np.testing.assert_allclose(scaled, [[0, 0.5], [1, 1]])
    with pytest.raises(FineMaskError, match="2-D grey or RGB"):
        logic.image_for_engine(np.zeros((3, 4, 5), np.uint8), False)


class _RecordingRefiner:
    """Stands in for engine.refine.Refiner: records its input, moves one pixel to class 0."""

    def __init__(self):
        self.calls = []
        self.options = []

    def refine_labels(self, image, labels, probs=None, **kwargs):
        self.calls.append((labels.copy(), probs))
        self.options.append({k: kwargs[k] for k in ("fast", "skip_global")})
        out = labels.copy()
        out[0, 0] = 0
        return out


def test_refine_uses_probs_in_class_space_when_they_fit():
    values = np.array([[2, 2, 3], [1, 1, 3]], np.uint8)  # classes 1, 1, 2 / 0, 0, 2
    probs = np.full((3, 2, 3), 1 / 3, np.float16)
    fake = _RecordingRefiner()
    result = logic.refine(fake, np.zeros((2, 3, 3), np.uint8), values, probs)
    passed, passed_probs = fake.calls[0]
    np.testing.assert_array_equal(passed, values - 1)
    assert passed_probs is probs
    assert result.values[0, 0] == 1 and result.values.dtype == np.uint8  # class 0 -> value 1
    np.testing.assert_array_equal(result.changed, result.values != values)


def test_refine_treats_every_value_as_a_region_without_probs():
    drawn = np.zeros((2, 3), np.int64)  # napari's dtype for a new, hand-drawn Labels layer
    drawn[1, 1:] = 1
    fake = _RecordingRefiner()
    probs = np.ones((3, 2, 3), np.float16)
    out = logic.refine(fake, np.zeros((2, 3, 3), np.uint8), drawn, probs)  # unlabelled 0: probs unused
    passed, passed_probs = fake.calls[0]
    np.testing.assert_array_equal(passed, drawn)
    assert passed_probs is None and out.values.dtype == np.int64
    with pytest.raises(FineMaskError, match="choose the image they belong to"):
        logic.refine(fake, np.zeros((5, 5, 3), np.uint8), drawn)


def test_refine_modes_choose_the_steps_that_run():
    values = np.array([[1, 1, 0], [0, 0, 0]], np.uint8)
    fake = _RecordingRefiner()
    for mode in ("full", "fast", "local"):
        logic.refine(fake, np.zeros((2, 3, 3), np.uint8), values, mode=mode)
    assert fake.options == [{"fast": False, "skip_global": False}, {"fast": True, "skip_global": False},
                            {"fast": False, "skip_global": True}]
    with pytest.raises(FineMaskError, match="refinement mode must be one of full, fast, local"):
        logic.refine(fake, np.zeros((2, 3, 3), np.uint8), values, mode="quick")


def test_refine_with_a_tiny_refiner_keeps_size_and_values(tiny_models, scene):
    from engine.refine import Refiner

    refiner = Refiner.from_pretrained(tiny_models[1], device="cpu")
    drawn = np.zeros(scene.shape[:2], np.uint8)
    drawn[:20, :] = 1  # a rough "sky" drawn by hand
    out = logic.refine(refiner, scene, drawn, mode="fast")
    assert out.values.shape == drawn.shape
    assert set(np.unique(out.values)) <= {0, 1}


def test_save_update_and_undo_through_the_store(tmp_path, scene):
    store = Store.open(tmp_path / "store")
    first = np.ones(scene.shape[:2], np.uint8)
    first[:10] = 0  # unlabelled band
    saved = logic.save_pair(store, scene, first, ["a", "b", "c"], origin="predicted", name="my scene")
    assert saved.created and saved.pair_id == "my_scene"
    assert store.class_names == ["a", "b", "c"]
    _, labels = store.load(saved.pair_id)
    assert labels[0, 0] == logic.UNLABELLED and labels[20, 0] == 0

    second = first.copy()
    second[30:, :] = 3
    again = logic.save_pair(store, scene, second, ["a", "b", "c"], pair_id=saved.pair_id)
    assert not again.created and again.versions == 1 and len(store) == 1
    np.testing.assert_array_equal(store.load(saved.pair_id)[1], logic.layer_to_classes(second))

    restored = logic.undo_pair(store, saved.pair_id)
    np.testing.assert_array_equal(restored, first)
    np.testing.assert_array_equal(store.load(saved.pair_id)[1], logic.layer_to_classes(first))

    with pytest.raises(FineMaskError, match="this store's classes are a, b, c"):
        logic.save_pair(store, scene, first, ["x", "y"])
    with pytest.raises(FineMaskError, match="label 3 is not a class"):
        logic.save_pair(store, scene, second, ["a", "b"])


def test_saving_the_same_image_file_again_updates_its_pair(tmp_path, scene):
    path = tmp_path / "photo.png"
    Image.fromarray(scene).save(path)
    store = Store.open(tmp_path / "store")
    values = np.ones(scene.shape[:2], np.uint8)
    a = logic.save_pair(store, scene, values, ["a", "b"], image_file=path)
    assert a.pair_id == "photo" and store.get("photo").image_path.suffix == ".png"
    b = logic.save_pair(store, scene, values + 1, ["a", "b"], image_file=path)  # e.g. next session
    assert b.pair_id == "photo" and not b.created and len(store) == 1


def test_writer_and_reader_round_trip_names_and_colours(tmp_path):
    values = np.array([[0, 1, 2], [3, 3, 1]], np.uint8)
    palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    meta = {"metadata": {"finemask": {"classes": ["sky", "road", "car"], "palette": palette}}}
    for asked, written_as in (("labels.tif", "labels.finemask.tif"), ("mask.png", "mask.finemask.png"),
                              ("again.finemask.tif", "again.finemask.tif"), ("bare", "bare.finemask.tif")):
        (written,) = writer.write_labels(str(tmp_path / asked), values, meta)
        assert written == str(tmp_path / written_as)  # the name napari offers FineMask's reader for
        assert reader.get_reader(written) is not None
        data, kwargs, kind = reader.read(written)[0]
        assert kind == "labels" and kwargs["name"] == written_as.split(".")[0]
        np.testing.assert_array_equal(data, values)
        assert kwargs["metadata"]["finemask"]["classes"] == ["sky", "road", "car"]
        assert kwargs["features"]["class"] == ["unlabelled", "sky", "road", "car"]
        assert kwargs["colormap"][2] == pytest.approx((40 / 255, 50 / 255, 60 / 255, 1.0))
    stored = tifffile.imread(tmp_path / "labels.finemask.tif")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, [[255, 0, 1], [2, 2, 0]])
    with pytest.raises(FineMaskError, match="label 3 is not a class"):
        writer.write_labels(str(tmp_path / "bad.tif"), values,
                            {"metadata": {"finemask": {"classes": ["a", "b"]}}})
    with pytest.raises(FineMaskError, match=r"\.tif, \.tiff or \.png"):
        writer.write_labels(str(tmp_path / "x.jpg"), values, meta)


def test_label_files_carry_names_and_palette_backward_compatibly(tmp_path):
    from engine.io import read_label_info, read_labels, write_labels

    labels = np.array([[0, 1], [2, 1]], np.uint8)
    plain = write_labels(tmp_path / "plain.tif", labels)
    assert read_label_info(plain) == {}  # as before: no names, same pixels
    named = write_labels(tmp_path / "named.tif", labels, classes=["a", "b", "c"], palette=[[1, 2, 3]] * 3)
    assert read_label_info(named) == {"classes": ["a", "b", "c"], "palette": [[1, 2, 3]] * 3}
    png = write_labels(tmp_path / "named.png", labels, classes=["a", "b", "c"], palette=[[9, 8, 7]] * 3)
    assert read_label_info(png) == {"classes": ["a", "b", "c"], "palette": [[9, 8, 7]] * 3}
    for path in (plain, named, png):
        np.testing.assert_array_equal(read_labels(path), labels)
    assert read_label_info(write_labels(tmp_path / "palette.png", labels, palette=[[1, 1, 1]])) == {}


def test_reader_patterns_claim_only_finemask_names():
    import yaml

    manifest = yaml.safe_load((Path(reader.__file__).parent / "napari.yaml").read_text())
    patterns = manifest["contributions"]["readers"][0]["filename_patterns"]
    from fnmatch import fnmatch

    def claimed(name):
        return any(fnmatch(name, p) for p in patterns)

    for ours in ("x.finemask.tif", "x.finemask.png", "frame_01.v3.tif", "a.b.finemask.tiff"):
        assert claimed(ours), ours
    for theirs in ("photo.jpg", "photo.png", "cells.tif", "scan.tiff", "IMG_0001.JPG", "labels.tif", "mask.png"):
        assert not claimed(theirs.lower()), theirs


def test_reader_reads_pixels_through_engine_io(tmp_path, scene):
    """EXIF orientation, 16-bit colour PNGs and truncated files: the engine's rules, not PIL's."""
    import imagecodecs

    turned = tmp_path / "turned.finemask.png"  # any file given to this reader (say, a remembered choice)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(scene).save(turned, exif=exif.tobytes())
    image, _, kind = reader.read(str(turned))[0]
    assert kind == "image" and image.shape == (scene.shape[1], scene.shape[0], 3)
    np.testing.assert_array_equal(image, np.rot90(scene, k=-1))

    deep = (np.arange(48 * 40 * 3, dtype=np.uint32).reshape(48, 40, 3) * 17 % 65536).astype(np.uint16)
    deep_path = tmp_path / "deep.png"
    deep_path.write_bytes(imagecodecs.png_encode(deep))
    data, meta, kind = reader.read(str(deep_path))[0]
    assert kind == "image" and data.dtype == np.uint16 and meta["rgb"]
    np.testing.assert_array_equal(data, deep)

    short = tmp_path / "short.png"
    full = (tmp_path / "full.png")
    Image.fromarray(scene).save(full)
    short.write_bytes(full.read_bytes()[:-200])
    with pytest.raises(FineMaskError, match="short.png"):
        reader.read(str(short))


def test_reader_opens_store_files_with_the_store_names(tmp_path, scene):
    from engine.io import write_labels

    palette_png = tmp_path / "mask.png"  # a palette PNG (what `finemask segment -o x.png` writes)
    write_labels(palette_png, np.array([[0, 1], [1, 2]], np.uint8), palette=[[10, 20, 30], [40, 50, 60], [7, 8, 9]])
    data, kwargs, kind = reader.read(str(palette_png))[0]
    np.testing.assert_array_equal(data, [[1, 2], [2, 3]])
    assert kwargs["colormap"][2] == pytest.approx((40 / 255, 50 / 255, 60 / 255, 1.0))
    assert "classes" not in kwargs["metadata"]["finemask"]  # no made-up names: the dock asks for real ones

    micro = tmp_path / "cells.tif"
    tifffile.imwrite(micro, np.arange(5 * 64 * 96, dtype=np.uint16).reshape(5, 64, 96))
    assert reader.get_reader(str(micro)) is None  # a stack: napari's own reader shows all of it

    store = Store.open(tmp_path / "store")
    store.set_class_names(["sky", "ground"])
    pid = store.add(scene, np.ones(scene.shape[:2], np.uint8), origin="corrected")
    rec = store.get(pid)
    image, _, kind = reader.read(str(rec.image_path))[0]
    assert kind == "image" and image.dtype == np.uint8
    np.testing.assert_array_equal(image, scene)
    labels, kwargs, kind = reader.read(str(rec.labels_path))[0]
    assert kind == "labels" and (labels == 2).all()
    assert kwargs["features"]["class"] == ["unlabelled", "sky", "ground"]
    assert kwargs["metadata"]["finemask"]["pair"] == {"store": str(store.root), "id": pid}


def test_background_classes_are_transparent_and_listed_in_the_legend():
    colours = logic.label_colours([[0, 0, 0], [255, 0, 0]], ["background", "lesion"])
    assert colours[1] == logic.TRANSPARENT and colours[2] == (1.0, 0.0, 0.0, 1.0)
    legend = logic.legend_html(["background", "lesion"], [[0, 0, 0], [255, 0, 0]])
    assert "#ff0000" in legend and "lesion" in legend and "background (not drawn)" in legend


def test_fine_tuning_duration_and_progress_words():
    assert "about 5 min" in logic.expected_duration(300, 300.0, None)
    assert logic.expected_duration(300, 300.0, 0.5) .startswith("about 2 min (300 steps at 0.5 s/step)")
    assert "about 5 min (the time budget" in logic.expected_duration(300, 300.0, 4.0)
    assert "no time limit" in logic.expected_duration(300, None, None)
    assert logic.expected_duration(300, None, 30.0).startswith("about 2 h 30 min")
    assert logic.finetune_fraction(18, 300, 290.0, 300.0) == pytest.approx(290 / 300)  # the budget ends it first
    assert logic.finetune_fraction(150, 300, 1.0, None) == 0.5


def test_sample_data():
    (data, meta, kind), = samples.outdoor_scene()
    assert kind == "image" and data.dtype == np.uint8 and data.shape == (1468, 2199, 3)
    assert "public domain" in meta["metadata"]["attribution"]
    if (samples.SAMPLES / "idrid_50.jpg").is_file():
        (fundus, meta, _), = samples.fundus_4k()
        assert fundus.shape == (2848, 4288, 3) and "CC BY 4.0" in meta["metadata"]["attribution"]
    else:
        with pytest.raises(FineMaskError, match="idrid_50.jpg"):
            samples.fundus_4k()
