"""Annotation store and fine-tuning under hostile input (issue 36): manifest paths outside the
store, malformed manifests, stores without labelled pixels, absurd class ids, memory, full disks."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from engine.errors import FineMaskError
from engine.io import write_image, write_labels
from engine.memory_guard import MemoryBudgetError
from engine.store import Store
from training.finetune import FinetuneConfig, finetune, list_versions, models_dir, next_version_name
from training.finetune_checks import MAX_CLASSES, check_memory, segmentation_item_bytes
from training.tiny import make_tiny_segmenter

SHAPE = (24, 32)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)


def labels(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, n, SHAPE).astype(np.uint16)


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def edit_manifest(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def finetune_error(capsys) -> str:
    """The CLI's error line of ``finemask finetune`` (its progress bar also writes to stderr)."""
    err = capsys.readouterr().err
    errors = [line.split("finemask finetune: error: ", 1)[1] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --- 2. paths in the manifest must stay inside the store --------------------------------------


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("not the store's to delete")
    return path


def _outside_forms(root: Path, victim: Path) -> dict[str, str]:
    link = root / "labels" / "link.tif"
    link.symlink_to(victim)
    return {"dotdot": "../victim.txt", "absolute": str(victim), "through labels": "labels/../../victim.txt",
            "symlink in labels": "labels/link.tif"}


@pytest.mark.parametrize("form", ["dotdot", "absolute", "through labels", "symlink in labels"])
def test_undo_never_deletes_a_labels_path_outside_the_store(tmp_path, victim, capsys, form):
    root = tmp_path / "s"
    store = Store.open(root)
    pid = store.add(image(0), labels(0), "predicted", name="p")
    store.add(image(1), labels(1), "predicted", name="q")
    store.update(pid, labels(2))
    rel = _outside_forms(root, victim)[form]
    edit_manifest(root, lambda m: m["pairs"][0].update(labels=rel))
    before = listing(root)

    assert main(["store", "undo", str(root), pid]) == 2
    line = one_error_line(capsys)
    assert "manifest.json" in line and "not inside the store" in line and "nothing was changed" in line
    assert victim.read_text() == "not the store's to delete" and listing(root) == before
    with pytest.raises(FineMaskError, match="not inside the store"):
        Store.open(root).update(pid, labels(3))
    assert victim.read_text() == "not the store's to delete" and listing(root) == before

    assert main(["store", "info", str(root)]) == 0  # the pair is a listed problem; the other pair is fine
    out = capsys.readouterr().out
    assert "problem:" in out and "not inside the store's labels/ folder" in out and "\nq\t" in f"\n{out}"
    reopened = Store.open(root)
    assert [r.id for r in reopened.pairs()] == ["q"] and reopened.get(pid).problem is not None
    assert {p.kind for p in reopened.problems if p.pair_id == pid} == {"outside"}
    with pytest.raises(FineMaskError, match="cannot be used"):
        reopened.load(pid)
    reopened.clean()
    assert victim.read_text() == "not the store's to delete"


def test_history_limit_0_update_never_deletes_an_absolute_path(tmp_path, victim):
    root = tmp_path / "s"
    store = Store.open(root, history_limit=0)
    pid = store.add(image(0), labels(0), "predicted")
    edit_manifest(root, lambda m: m["pairs"][0].update(labels=str(victim)))
    with pytest.raises(FineMaskError, match="not inside the store"):
        Store.open(root).update(pid, labels(1))
    assert victim.read_text() == "not the store's to delete"


def test_earlier_version_and_image_outside_the_store_make_the_pair_a_problem(tmp_path, victim):
    root = tmp_path / "s"
    store = Store.open(root)
    pid = store.add(image(0), labels(0), "predicted")
    store.update(pid, labels(1))
    edit_manifest(root, lambda m: m["pairs"][0]["history"][0].update(labels="../victim.txt"))
    with pytest.raises(FineMaskError, match="not inside the store"):
        Store.open(root).undo(pid)
    assert victim.exists() and Store.open(root).pairs() == []
    edit_manifest(root, lambda m: m["pairs"][0].update(history=[], image="../victim.txt"))
    problems = [p for p in Store.open(root).problems if p.kind != "orphan"]
    assert [(p.kind, p.path) for p in problems] == [("outside", root / "../victim.txt")]
    assert "images/ folder" in problems[0].message


def test_clean_never_follows_a_symlinked_images_folder(tmp_path):
    root, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    Store.open(root)
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"someone else's")
    (root / "images").rmdir()
    (root / "images").symlink_to(elsewhere, target_is_directory=True)
    Store.open(root).clean()
    assert (elsewhere / "keep.png").read_bytes() == b"someone else's"


# --- 3. every manifest field is checked --------------------------------------------------------


def _pair(m):
    return m["pairs"][0]


MALFORMED = {  # name: (change to the manifest, or its whole text; what the error must name)
    "settings null": (lambda m: m.update(settings=None), "settings"),
    "settings a list": (lambda m: m.update(settings=[1, 2]), "settings"),
    "history 5": (lambda m: _pair(m).update(history=5), "history"),
    "history [1]": (lambda m: _pair(m).update(history=[1]), "history[0]"),
    "classes null": (lambda m: _pair(m).update(classes=None), "classes"),
    "image null": (lambda m: _pair(m).update(image=None), "image"),
    "image an int": (lambda m: _pair(m).update(image=7), "image"),
    "shape []": (lambda m: _pair(m).update(shape=[]), "shape"),
    "class_names 5": (lambda m: m["settings"].update(class_names=5), "class_names"),
    "format_version null": (lambda m: m.update(format_version=None), "format_version"),
    "format_version 1e400": ('{"format": "finemask-store", "format_version": 1e400, "pairs": []}', "format_version"),
    "100k nested [": ("[" * 100_000, "nested too deeply"),
    "history_limit text": (lambda m: m["settings"].update(history_limit="10"), "history_limit"),
    "validation_fraction inf": (lambda m: m["settings"].update(validation_fraction=float("inf")),
                                "validation_fraction"),
    "pairs null": (lambda m: m.update(pairs=None), "pairs"),
    "pair a string": (lambda m: m.update(pairs=["x"]), "pairs[0]"),
    "id with a slash": (lambda m: _pair(m).update(id="../../x"), "id"),
    "id repeated": (lambda m: m["pairs"].append(dict(_pair(m))), "repeats the id"),
    "sha256 short": (lambda m: _pair(m).update(labels_sha256="abc"), "labels_sha256"),
    "image_bytes negative": (lambda m: _pair(m).update(image_bytes=-1), "image_bytes"),
    "origin unknown": (lambda m: _pair(m).update(origin="guessed"), "origin"),
    "split null": (lambda m: _pair(m).update(split=None), "split"),
    "next_version 0": (lambda m: _pair(m).update(next_version=0), "next_version"),
    "classes beyond uint16": (lambda m: _pair(m).update(classes=[70000]), "classes"),
    "key missing": (lambda m: _pair(m).pop("labels"), "lacks the key(s) labels"),
    "history version lacks labels": (lambda m: _pair(m)["history"][0].pop("labels"), "history[0]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_gives_one_clear_error_naming_the_file_and_field(tmp_path, capsys, case):
    root = tmp_path / "s"
    store = Store.open(root)
    pid = store.add(image(0), labels(0), "predicted", name="p")
    store.update(pid, labels(1))
    change, named = MALFORMED[case]
    if isinstance(change, str):
        (root / "manifest.json").write_text(change)
    else:
        edit_manifest(root, change)
    before = listing(root)

    for opener in (lambda: Store.open(root, create=False), lambda: Store.open(root), lambda: store.pairs(),
                   lambda: store.update(pid, labels(2)), lambda: store.undo(pid)):
        with pytest.raises(FineMaskError) as err:
            opener()
        assert err.value.path == root / "manifest.json" and named in str(err.value)
    assert main(["store", "info", str(root)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("finemask store: error: ") and "manifest.json" in line and named in line
    assert main(["store", "undo", str(root), pid]) == 2 and "manifest.json" in one_error_line(capsys)
    assert listing(root) == before  # nothing written, nothing deleted


def test_a_hand_edited_next_version_never_overwrites_a_stored_version(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root)
    pid = store.add(image(0), labels(0), "predicted")
    store.update(pid, labels(1))
    edit_manifest(root, lambda m: _pair(m).update(next_version=1))
    rec = Store.open(root).update(pid, labels(2))
    store = Store.open(root)
    assert store.problems == [] and rec.history_length == 2
    np.testing.assert_array_equal(store.load(pid)[1], labels(2))
    assert store.undo(pid).history_length == 1
    np.testing.assert_array_equal(store.load(pid)[1], labels(1))


# --- 4b / 6. fine-tuning refuses what cannot work, before training -----------------------------


def make_store(root: Path, n: int = 6) -> Store:
    store = Store.open(root)
    for i in range(n):
        store.add(image(i), labels(i, 2), "corrected", name=f"pair{i}")
    assert store.pairs("validation") and store.pairs("train")
    return store


FAST = dict(steps=2, batch_size=2, crop=(32, 32), ckpt_every=1, log_every=1)


def nothing_trained(store: Store) -> bool:
    folder = models_dir(store)
    runs = folder / ".runs"
    return list_versions(store) == [] and not any(runs.rglob("state*") if runs.is_dir() else [])


@pytest.mark.parametrize("split", ["validation", "train"])
def test_finetune_refuses_a_split_without_labelled_pixels(tmp_path, split):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    store = make_store(tmp_path / "s")
    for rec in store.pairs(split):
        store.update(rec.id, np.full(SHAPE, 255, np.uint16))
    with pytest.raises(FineMaskError, match=f"{split} pair.*hold no labelled pixels") as err:
        finetune(store, base, FinetuneConfig(**FAST))
    assert "255" in str(err.value) and nothing_trained(store)


def test_cli_finetune_without_labelled_validation_pixels_is_one_line(tmp_path, capsys):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    store = make_store(tmp_path / "s")
    for rec in store.pairs("validation"):
        store.update(rec.id, np.full(SHAPE, 7, np.uint16))
    code = main(["finetune", str(store.root), "--base", str(base), "--steps", "2", "--batch-size", "2",
                 "--crop", "32", "32", "--ignore-index", "7"])
    assert code == 2 and "hold no labelled pixels" in finetune_error(capsys) and nothing_trained(store)


@pytest.mark.parametrize("absurd", [5000, 60000])
def test_finetune_refuses_an_absurd_label_id_naming_it_and_its_file(tmp_path, absurd):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    store = make_store(tmp_path / "s")
    bad = store.pairs("train")[1]
    lab = labels(9, 2)
    lab[3:6, 4:9] = absurd
    store.update(bad.id, lab)
    with pytest.raises(FineMaskError, match=f"label id {absurd} would make a model of {absurd + 1} classes") as err:
        finetune(store, base, FinetuneConfig(**FAST))
    assert err.value.path == store.get(bad.id).labels_path and str(MAX_CLASSES) in str(err.value)
    assert nothing_trained(store)


def test_cli_ignore_index_65535_with_an_absurd_id_is_refused_not_allocated(tmp_path, capsys):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    store = make_store(tmp_path / "s")
    lab = labels(9, 2)
    lab[:4] = 255  # unlabelled in the store's convention, a class under --ignore-index 65535
    lab[5:8, 5:8] = 60000
    store.update(store.pairs("train")[0].id, lab)
    code = main(["finetune", str(store.root), "--base", str(base), "--steps", "2", "--batch-size", "2",
                 "--crop", "128", "128", "--ignore-index", "65535"])
    line = finetune_error(capsys)
    assert code == 2 and "label id 60000" in line and ".tif" in line and nothing_trained(store)


def test_finetune_memory_guard_refuses_with_the_figures_before_training(tmp_path, monkeypatch):
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    store = make_store(tmp_path / "s")
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "4M")
    with pytest.raises(MemoryBudgetError) as err:
        finetune(store, base, FinetuneConfig(**{**FAST, "crop": (256, 256), "batch_size": 4}))
    message = str(err.value)
    assert "4 crops of 256x256 pixels with 2 classes" in message and "MiB" in message and "--crop" in message
    assert nothing_trained(store)


def test_memory_estimate_grows_with_crop_batch_and_classes_and_bounds_the_guard(tmp_path, monkeypatch):
    from engine.checkpoints import load_checkpoint
    from training.finetune import SegmentationJob

    store = make_store(tmp_path / "s")

    def job(num_classes: int, crop: tuple[int, int] = (64, 64)) -> SegmentationJob:
        base = make_tiny_segmenter(tmp_path / f"b{num_classes}", num_classes=num_classes, input_size=(32, 24))
        state, card = load_checkpoint(base)
        return SegmentationJob(state, card, store, FinetuneConfig(crop=crop, batch_size=2))

    two, many = job(2), job(200)
    item = segmentation_item_bytes(two.model, (64, 64))
    assert segmentation_item_bytes(two.model, (128, 128)) == pytest.approx(4 * item, rel=1e-6)  # per pixel
    assert segmentation_item_bytes(many.model, (64, 64)) - item >= 198 * 64 * 64 * 16  # logits per class
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", "64G")
    total = check_memory(two, 2, device="cpu")
    assert check_memory(two, 4, device="cpu") - total == 2 * item
    # a budget just above the estimate passes, just below refuses (the guard keeps 20% slack)
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", str(int(total / 0.8 * 1.05)))
    assert check_memory(two, 2, device="cpu") == total
    monkeypatch.setenv("FINEMASK_MEMORY_LIMIT", str(int(total / 0.8 * 0.95)))
    with pytest.raises(MemoryBudgetError, match="2 crops of 64x64 pixels with 2 classes"):
        check_memory(two, 2, device="cpu")


def test_cards_with_missing_or_null_metrics_are_read_safely(tmp_path):
    store = make_store(tmp_path / "s")
    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    card = json.loads((base / "card.json").read_text())
    (base / "card.json").write_text(json.dumps({**card, "metrics": {"after": {"miou": None, "pairs": 3}}}))
    result = finetune(store, base, FinetuneConfig(**FAST))  # a base whose card has no scores
    assert result.after["miou"] is not None and result.after["pairs"] == len(store.pairs("validation"))
    written = json.loads((result.model_path / "card.json").read_text())
    assert written["metrics"]["after"]["miou"] == result.after["miou"]  # never an unscored version
    for name, metrics in {"tiny-ft2": None, "tiny-ft3": {"before": None, "after": None}, "tiny-ft4": "x"}.items():
        folder = models_dir(store) / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((result.model_path / "model.safetensors").read_bytes())
        edited = {**written, "name": name}
        if metrics is None:
            edited.pop("metrics")
        else:
            edited["metrics"] = metrics
        (folder / "card.json").write_text(json.dumps(edited))
    names = [name for name, _, _ in list_versions(store)]
    assert names[0] == "tiny-ft1" and sorted(names) == ["tiny-ft1", "tiny-ft2", "tiny-ft3"]  # "x": not a card
    assert next_version_name(store, "tiny-ft3") == "tiny-ft5"


# --- 8b. a new store is made whole or not at all -----------------------------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["new folder", "new parents", "empty folder", "folder with other files"])
def test_store_creation_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch, where):
    parent = tmp_path / "work"
    parent.mkdir()
    root = parent / ("a/b/s" if where == "new parents" else "s")
    if where == "empty folder":
        root.mkdir()
    if where == "folder with other files":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    before = listing(parent)
    monkeypatch.setattr("engine.store.creation.atomic_write_text", _disk_full)
    with pytest.raises(FineMaskError, match="No space left on device") as err:
        Store.open(root)
    assert err.value.path is not None and listing(parent) == before
    monkeypatch.undo()
    store = Store.open(root)  # and with room on the disk, the same call makes a whole store
    assert len(store) == 0 and (root / "manifest.json").is_file() and (root / "images").is_dir()
    assert not [p for p in parent.rglob(".*") if p.name != ".lock"]  # no temporary sibling left


def test_cli_store_add_to_a_new_store_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    im = write_image(data / "a.png", image(0))
    write_labels(data / "labels" / "a.png", labels(0).astype(np.uint8))
    before = listing(tmp_path)
    for target in ("engine.store.store.write_labels", "engine.store.store.atomic_write_text",
                   "engine.store.creation.atomic_write_text"):
        monkeypatch.setattr(target, _disk_full)
        code = main(["store", "add", str(tmp_path / "new"), str(im), "--labels", str(data / "labels")])
        assert code == 2 and "No space left on device" in one_error_line(capsys)
        assert listing(tmp_path) == before  # no store folder, no images/, labels/ or .lock
        monkeypatch.undo()
    assert main(["store", "add", str(tmp_path / "new"), str(im), "--labels", str(data / "labels")]) == 0
    assert len(Store.open(tmp_path / "new", create=False)) == 1


def test_cli_store_add_keeps_an_existing_store_when_a_pair_fails(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    im = write_image(data / "a.png", image(0))
    write_labels(data / "labels" / "a.png", labels(0).astype(np.uint8))
    Store.open(tmp_path / "old")
    monkeypatch.setattr("engine.store.store.write_labels", _disk_full)
    assert main(["store", "add", str(tmp_path / "old"), str(im), "--labels", str(data / "labels")]) == 2
    capsys.readouterr()
    assert (tmp_path / "old" / "manifest.json").is_file() and len(Store.open(tmp_path / "old")) == 0
