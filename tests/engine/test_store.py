"""Annotation store: add/update/undo, bounded history, splits, crash safety, two writers, bad input."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.errors import FineMaskError
from engine.filelock import FileLock
from engine.io import read_image, read_labels, write_image, write_labels
from engine.store import (
    MIN_PAIRS_FOR_VALIDATION,
    VALIDATION_FRACTION,
    Store,
    assign_split,
    split_score,
)

WRITER = Path(__file__).with_name("store_crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
SHAPE = (12, 16)


def rand_image(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def rand_labels(seed: int, shape=SHAPE, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, n, shape).astype(np.uint16)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_writer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(WRITER), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- add / get / load --------------------------------------------------------------------------


def test_add_copies_files_and_records_everything(tmp_path):
    store = Store.open(tmp_path / "s")
    src = tmp_path / "tile 01.tif"
    image16 = np.random.default_rng(1).integers(0, 65536, (*SHAPE, 3), dtype=np.uint16)
    tifffile.imwrite(src, image16)
    labels = rand_labels(1)
    labels[0, 0] = 300  # a class id beyond uint8
    pid = store.add(src, labels, "refined", model_version="dsrl-v1")

    rec = store.get(pid)
    assert pid == "tile_01" and rec.image_path.suffix == ".tif"
    assert rec.image_path.read_bytes() == src.read_bytes()  # bytes copied, not re-encoded
    assert rec.image_sha256 == sha256(src) == sha256(rec.image_path)
    assert rec.labels_sha256 == sha256(rec.labels_path)
    assert rec.shape == SHAPE and rec.origin == "refined" and rec.model_version == "dsrl-v1"
    assert rec.classes == tuple(sorted(set(np.unique(labels).tolist())))
    assert rec.created == rec.updated and rec.split in ("train", "validation") and rec.problem is None
    with tifffile.TiffFile(rec.labels_path) as tif:  # uint16, zlib
        assert tif.pages[0].dtype == np.uint16 and tif.pages[0].compression == 8
    image, got = store.load(pid)
    np.testing.assert_array_equal(image, read_image(src))
    np.testing.assert_array_equal(got, labels)
    assert got.dtype == np.uint16

    # An array image (uint8 -> PNG) and labels from a file; a second add of the same name gets a suffix.
    write_labels(tmp_path / "lab.png", rand_labels(2))
    pid2 = store.add(rand_image(2), tmp_path / "lab.png", "predicted")
    pid3 = store.add(src, labels, "corrected")
    assert pid2 == "pair" and pid3 == "tile_01-2"
    assert store.get(pid2).image_path.suffix == ".png"
    image2, labels2 = store.load(pid2)
    np.testing.assert_array_equal(image2, rand_image(2).astype(np.float32) / 255)
    np.testing.assert_array_equal(labels2, rand_labels(2))
    assert store.get(pid3).split == store.get(pid).split  # same image, same split
    with pytest.raises(FineMaskError, match="already exists"):
        store.add(src, labels, "corrected", name="tile 01")
    assert [r.id for r in store.pairs()] == ["tile_01", "pair", "tile_01-2"]


def test_manifest_holds_the_documented_fields(tmp_path):
    store = Store.open(tmp_path / "s")
    store.add(rand_image(0), rand_labels(0), "predicted", model_version="m0", name="x")
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    rec = data["pairs"][0]
    for key in ("id", "image", "image_sha256", "labels_sha256", "shape", "classes", "origin",
                "model_version", "created", "updated", "split"):
        assert key in rec
    assert rec["image"] == "images/x.png" and rec["labels"].startswith("labels/") and rec["shape"] == list(SHAPE)


# --- update / undo / history -------------------------------------------------------------------


def test_update_and_undo_survive_reopening(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root)
    pid = store.add(rand_image(0), rand_labels(0), "predicted", model_version="base")
    store.update(pid, rand_labels(1), model_version="ft-1")
    rec = store.update(pid, rand_labels(2), origin="refined")
    assert rec.origin == "refined" and rec.history_length == 2 and rec.updated >= rec.created
    hist = store.history(pid)
    assert [h.origin for h in hist] == ["corrected", "predicted"]  # newest first
    assert [h.model_version for h in hist] == ["ft-1", "base"]
    np.testing.assert_array_equal(read_labels(hist[0].labels_path), rand_labels(1))

    reopened = Store.open(root, create=False)  # a fresh process would see the same
    np.testing.assert_array_equal(reopened.load(pid)[1], rand_labels(2))
    assert [h.labels_sha256 for h in reopened.history(pid)] == [h.labels_sha256 for h in hist]
    back = reopened.undo(pid)
    assert back.origin == "corrected" and back.model_version == "ft-1" and back.history_length == 1
    np.testing.assert_array_equal(Store.open(root).load(pid)[1], rand_labels(1))
    Store.open(root).undo(pid)
    np.testing.assert_array_equal(Store.open(root).load(pid)[1], rand_labels(0))
    assert Store.open(root).get(pid).origin == "predicted"
    with pytest.raises(FineMaskError, match="no earlier labels"):
        Store.open(root).undo(pid)
    # Undone versions are gone from disk; only the current labels file remains.
    assert [p.name for p in (root / "labels").iterdir()] == [store.get(pid).labels_path.name]
    assert store.problems == []


def test_history_is_bounded_and_drops_the_oldest(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root, history_limit=3)
    pid = store.add(rand_image(0), rand_labels(0), "predicted")
    for k in range(1, 7):
        store.update(pid, rand_labels(k), model_version=f"v{k}")
    assert [h.model_version for h in store.history(pid)] == ["v5", "v4", "v3"]
    assert len(list((root / "labels").iterdir())) == 4  # current + 3 kept, the rest deleted
    # The limit is kept in the manifest; a later open can change it for every process.
    assert Store.open(root).history_limit == 3
    Store.open(root, history_limit=1).update(pid, rand_labels(9))
    assert [h.model_version for h in Store.open(root).history(pid)] == ["v6"]
    assert len(list((root / "labels").iterdir())) == 2
    assert store.problems == []


# --- splits ------------------------------------------------------------------------------------


def test_split_rule_is_stable_bounded_and_fills_validation_at_five():
    rng = np.random.default_rng(0)
    shas = [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(400)]
    # Rule 2: the hash decides for a pair whose score is below the fraction while validation has room.
    for sha in shas[:50]:
        if split_score(sha) < VALIDATION_FRACTION:
            assert assign_split(sha, [{"image_sha256": "0" * 64, "split": "train"}] * 9) == "validation"
            assert assign_split(sha, [{"image_sha256": "0" * 64, "split": "validation"}] * 2) == "train"
    # Many random stores: no validation below 5 pairs, at least one from 5 on, never more than the share.
    for start in range(0, 400, 20):
        recs: list[dict] = []
        for n, sha in enumerate(shas[start:start + 20], start=1):
            recs.append({"image_sha256": sha, "split": assign_split(sha, recs)})
            in_validation = sum(r["split"] == "validation" for r in recs)
            assert in_validation == 0 if n < MIN_PAIRS_FOR_VALIDATION else 1 <= in_validation <= max(1, n // 5)
    # A large store ends near the fraction, and its validation pairs are hash-chosen ones.
    recs = []
    for sha in shas:
        recs.append({"image_sha256": sha, "split": assign_split(sha, recs)})
    validation = [r for r in recs if r["split"] == "validation"]
    assert 0.1 < len(validation) / len(shas) <= VALIDATION_FRACTION
    assert sum(split_score(r["image_sha256"]) < VALIDATION_FRACTION for r in validation) >= len(validation) - 1


def test_store_splits_are_deterministic_and_never_move(tmp_path):
    def build(root: Path, seeds) -> Store:
        store = Store.open(root)
        for s in seeds:
            store.add(rand_image(s), rand_labels(s), "predicted", name=f"p{s}")
        return store

    a = build(tmp_path / "a", range(5))
    splits5 = {r.id: r.split for r in a.pairs()}
    assert len(a.pairs("validation")) >= 1
    assert {r.id for r in a.pairs("train")} | {r.id for r in a.pairs("validation")} == set(splits5)
    b = build(tmp_path / "b", range(5))
    assert {r.id: r.split for r in b.pairs()} == splits5  # same ids, same split
    for s in range(5, 12):
        a.add(rand_image(s), rand_labels(s), "predicted", name=f"p{s}")
    a.update("p0", rand_labels(99))
    after = {r.id: r.split for r in Store.open(tmp_path / "a").pairs()}
    assert {k: after[k] for k in splits5} == splits5  # adding and updating moved nothing
    assert 1 <= sum(v == "validation" for v in after.values()) <= 12 // 5
    with pytest.raises(FineMaskError, match="unknown split"):
        a.pairs("test")


# --- classes, content hash ---------------------------------------------------------------------


def test_classes_and_content_hash(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root)
    h0 = store.content_hash()
    store.add(rand_image(0), np.zeros(SHAPE, np.uint8), "predicted", name="a")
    lab = np.full(SHAPE, 5, np.uint16)
    lab[2:5, 3:9] = 7
    store.add(rand_image(1), lab, "predicted", name="b")
    assert store.classes() == [0, 5, 7]
    h1 = store.content_hash()
    assert h1 != h0 and Store.open(root).content_hash() == h1  # stable across processes
    store.update("a", np.full(SHAPE, 3))
    h2 = store.content_hash()
    assert h2 != h1 and store.classes() == [3, 5, 7]
    store.undo("a")
    assert store.content_hash() == h1 and store.classes() == [0, 5, 7]


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_names_the_file_and_writes_nothing(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root)
    src = tmp_path / "img.png"
    write_image(src, rand_image(0))
    pid = store.add(src, rand_labels(0), "predicted")
    manifest_before = (root / "manifest.json").read_bytes()
    files_before = sorted(p.name for p in root.rglob("*"))

    with pytest.raises(FineMaskError) as err:
        store.add(src, np.zeros((5, 5), np.uint8), "predicted")
    assert err.value.path == src and "but the image is 12x16" in str(err.value)
    bad_labels = tmp_path / "wrong.tif"
    write_labels(bad_labels, np.zeros((3, 4), np.uint8))
    with pytest.raises(FineMaskError) as err:
        store.add(src, bad_labels, "predicted")
    assert err.value.path == bad_labels
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(FineMaskError) as err:
        store.add(garbage, rand_labels(0), "predicted")
    assert err.value.path == garbage
    with pytest.raises(FineMaskError) as err:
        store.add(tmp_path / "missing.png", rand_labels(0), "predicted")
    assert err.value.path == tmp_path / "missing.png"
    with pytest.raises(FineMaskError) as err:
        store.update(pid, np.zeros((SHAPE[0], SHAPE[1] + 1), np.uint8))
    assert err.value.path == store.get(pid).image_path and "but the image is" in str(err.value)
    with pytest.raises(FineMaskError, match="class ids"):
        store.update(pid, np.full(SHAPE, -1))
    with pytest.raises(FineMaskError, match="origin"):
        store.update(pid, rand_labels(1), origin="guessed")
    with pytest.raises(FineMaskError, match="no pair"):
        store.update("nope", rand_labels(1))

    assert (root / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in root.rglob("*")) == files_before


def test_opening_bad_folders(tmp_path):
    with pytest.raises(FineMaskError) as err:
        Store.open(tmp_path / "none", create=False)
    assert err.value.path == tmp_path / "none"
    root = tmp_path / "s"
    Store.open(root)
    (root / "manifest.json").write_text("{ not json")
    with pytest.raises(FineMaskError) as err:
        Store.open(root)
    assert err.value.path == root / "manifest.json"


def test_damaged_and_stray_files_are_reported_not_used(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root)
    for s in range(3):
        store.add(rand_image(s), rand_labels(s), "predicted", name=f"p{s}")
    store.update("p2", rand_labels(7))
    rec0, rec1 = store.get("p0"), store.get("p1")
    write_labels(rec0.labels_path, rand_labels(5))  # same size class map, different content
    rec1.image_path.unlink()
    (root / "labels" / "stray.tif").write_bytes(b"left by a crash")
    store.history("p2")[0].labels_path.unlink()  # an earlier version: reported, pair still usable

    reopened = Store.open(root)
    kinds = {(p.kind, p.path.name) for p in reopened.problems}
    assert ("altered", rec0.labels_path.name) in kinds
    assert ("missing", rec1.image_path.name) in kinds
    assert ("orphan", "stray.tif") in kinds
    assert ("missing", "p2.v001.tif") in kinds
    assert [r.id for r in reopened.pairs()] == ["p2"]
    assert reopened.get("p0").problem is not None
    with pytest.raises(FineMaskError) as err:
        reopened.load("p0")
    assert err.value.path == rec0.labels_path
    with pytest.raises(FineMaskError) as err:
        reopened.undo("p2")
    assert err.value.path.name == "p2.v001.tif"
    assert reopened.clean() == [root / "labels" / "stray.tif"]
    assert not (root / "labels" / "stray.tif").exists()
    assert all(p.kind != "orphan" for p in reopened.problems)


# --- crash safety ------------------------------------------------------------------------------


def _make_template(root: Path) -> None:
    store = Store.open(root, history_limit=2)
    store.add(rand_image(0), rand_labels(0), "predicted", model_version="base", name="a")
    store.add(rand_image(1), rand_labels(1), "refined", name="b")
    store.update("a", rand_labels(2))
    store.update("a", rand_labels(3))  # history of "a" is full: the next update drops one


def _state(root: Path) -> tuple:
    """Everything a user could observe of a store, times excluded; loads every pair."""
    store = Store.open(root, create=False)
    rows = []
    for rec in store.pairs():
        image, labels = store.load(rec.id)
        rows.append((
            rec.id, rec.split, rec.image_sha256, rec.labels_sha256, rec.origin, rec.classes,
            rec.model_version, tuple(h.labels_sha256 for h in store.history(rec.id)),
            hashlib.sha256(image.tobytes()).hexdigest(), hashlib.sha256(labels.tobytes()).hexdigest(),
        ))
    return tuple(rows)


def _referenced_files(store: Store) -> set[Path]:
    files = set()
    for rec in store.pairs():
        files |= {rec.image_path, rec.labels_path} | {h.labels_path for h in store.history(rec.id)}
    return files


@pytest.mark.parametrize("op", ["add", "update", "undo"])
def test_crash_at_every_write_step_leaves_old_or_new_state(tmp_path, op):
    template = tmp_path / "template"
    _make_template(template)
    old = _state(template)

    ref = tmp_path / "ref"
    shutil.copytree(template, ref)
    done = run_writer(str(ref), op, "-1")
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    new = _state(ref)
    assert new != old and steps >= 3
    assert Store.open(ref).problems == []

    seen = set()
    for k in range(steps):
        root = tmp_path / f"crash{k}"
        shutil.copytree(template, root)
        proc = run_writer(str(root), op, str(k))
        assert proc.returncode != 0, f"writer did not crash at step {k}"  # it really died mid-way
        state = _state(root)
        assert state in (old, new), f"{op}: broken state after a crash at step {k}"
        seen.add("new" if state == new else "old")
        store = Store.open(root, lock_timeout=5)  # the dead writer's lock is gone
        assert all(p.kind == "orphan" for p in store.problems), store.problems
        orphans = store.clean()
        seen.add("orphans" if orphans else "clean")
        assert store.check(full=True) == []
        on_disk = {p for p in root.rglob("*") if p.is_file()} - {root / "manifest.json", root / ".lock"}
        assert on_disk == _referenced_files(store)  # clean() found every leftover, temporaries included
        store.update("b", rand_labels(42))  # still writable
        assert Store.open(root).history("b")[0].origin == "refined"
    assert {"old", "new", "orphans"} <= seen  # crash points on both sides of the manifest rename


# --- two writers -------------------------------------------------------------------------------


def test_two_writers_lose_no_update(tmp_path):
    root = tmp_path / "s"
    n = 12
    store = Store.open(root, history_limit=2 * n + 1)
    store.add(rand_image(0), rand_labels(0), "predicted", name="shared")
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WRITER), str(root), "hammer", name, str(n), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name in ("w1", "w2")
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.{w}.ready").exists() for w in ("w1", "w2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start writing at once
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err

    store = Store.open(root)
    assert store.problems == []
    assert set(store.ids()) == {"shared"} | {f"w{w}-{i}" for w in (1, 2) for i in range(n)}
    for w in (1, 2):
        for i in range(n):
            assert store.get(f"w{w}-{i}").model_version == f"w{w}-{i}"
    shared = [store.get("shared").model_version] + [h.model_version for h in store.history("shared")]
    assert sorted(v for v in shared if v) == sorted(f"w{w}-{i}" for w in (1, 2) for i in range(n))
    for w in (1, 2):  # each writer's own updates stay in order
        mine = [v for v in shared if v and v.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in reversed(range(n))]


def test_lock_timeout_is_a_clear_error(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root, lock_timeout=0.2)
    before = (root / "manifest.json").read_bytes()
    with FileLock(root / ".lock"):
        with pytest.raises(FineMaskError, match="lock") as err:
            store.add(rand_image(0), rand_labels(0), "predicted")
    assert err.value.path == root / ".lock"
    assert (root / "manifest.json").read_bytes() == before
    assert store.add(rand_image(0), rand_labels(0), "predicted") == "pair"  # released again


def test_file_lock_excludes_other_holders_and_reenters(tmp_path):
    path = tmp_path / "x.lock"
    first, second = FileLock(path, timeout=0.1), FileLock(path, timeout=0.1)
    with first:
        with first:  # the holder may re-enter
            assert first.held
        assert first.held
        with pytest.raises(FineMaskError) as err:
            second.acquire()
        assert err.value.path == path and not second.held
    assert not first.held
    with second:  # free again once the holder left
        assert second.held
