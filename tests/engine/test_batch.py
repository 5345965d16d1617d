"""Batch processing on a local Dask cluster (2 worker processes x 1 thread) with tiny models.

Results must equal the single-process engine (``Segmenter.predict`` + ``Refiner.refine_labels``);
huge images read in parts must equal ``Refiner.refine_labels`` on the whole image; bad files,
killed workers, cancels and re-runs must never lose or corrupt an output.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.batch import (
    BatchConfig,
    model_loads,
    open_client,
    output_done,
    plan_jobs,
    read_summary,
    run_batch,
)
from engine.errors import FineMaskError
from engine.huge import LazyImage, local_tiles, refine_labels_tiled, segment_lazy
from engine.io import read_image, read_labels, write_image, write_labels
from engine.refine import Refiner
from engine.segment import Segmenter
from training.tiny import make_tiny_refiner, make_tiny_segmenter

distributed = pytest.importorskip("distributed")

L = 224  # refiner working/tile size in these tests (the default 900 would be one tile)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "seg", 3, (64, 48)), make_tiny_refiner(root / "ref")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.ERROR)
    c = distributed.Client(cluster)
    c.wait_for_workers(2)
    yield c
    c.close()
    cluster.close()


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB: a disc and a rectangle on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[:] = (30, 110, 190)
    img[(yy - 0.4 * h) ** 2 + (xx - 0.45 * w) ** 2 < (0.28 * min(h, w)) ** 2] = (200, 90, 40)
    img[(yy > 0.7 * h) & (xx > 0.65 * w)] = (20, 200, 30)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def make_folder(folder: Path, n: int = 8) -> Path:
    """``n`` small images in several formats and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = scene(90 + 7 * i, 120 + 5 * i, seed=i)
        if i % 3 == 0:
            write_image(folder / f"im{i}.png", img)
        elif i % 3 == 1:
            tifffile.imwrite(folder / f"im{i}.tif", (img.astype(np.uint16) * 257)[:, :, 0])  # 16-bit gray
        else:
            write_image(folder / f"im{i}.jpg", img)
    return folder


def reference(path: Path, seg: Segmenter, ref: Refiner | None, config: BatchConfig) -> np.ndarray:
    """The single-process result (what ``finemask segment [--refine]`` computes)."""
    image = read_image(path)
    result = seg.predict(image)
    if ref is None:
        return result.labels
    return ref.refine_labels(image, result.labels, result.probs, L=config.L, selection=config.selection,
                             batch_size=config.tile_batch)


def engine_models(models, precision="float32"):
    seg_dir, ref_dir = models
    return Segmenter.from_pretrained(seg_dir), Refiner.from_pretrained(ref_dir, device="cpu", precision=precision)


def only_outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------- planning


def test_plan_skips_hidden_and_flags_name_clashes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a.png", scene(20, 30))
    write_image(src / "a.jpg", scene(20, 30))
    write_image(src / ".hidden.png", scene(20, 30))
    (src / "notes.txt").write_text("x")
    jobs = plan_jobs(src, tmp_path / "out")
    assert [j.name for j in jobs] == ["a.jpg", "a.png"]
    assert jobs[0].output == tmp_path / "out" / "a.tif" and not jobs[0].error
    assert "a.jpg" in jobs[1].error and "a.png" in jobs[1].error
    with pytest.raises(FineMaskError, match="differ"):
        plan_jobs(src, src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FineMaskError, match="no images"):
        plan_jobs(tmp_path / "empty", tmp_path / "x")
    with pytest.raises(FineMaskError, match="not found"):
        plan_jobs(tmp_path / "missing", tmp_path / "x")


def test_output_done_accepts_only_complete_labels_of_the_right_size(tmp_path):
    labels = (np.arange(60 * 80).reshape(60, 80) % 3).astype(np.uint8)
    good = write_labels(tmp_path / "good.tif", labels)
    assert output_done(good, (60, 80))
    assert not output_done(good, (61, 80))  # written for another image
    data = good.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    assert not output_done(tmp_path / "cut.tif", (60, 80))
    (tmp_path / "text.tif").write_text("not a tiff")
    assert not output_done(tmp_path / "text.tif", (60, 80))
    tifffile.imwrite(tmp_path / "float.tif", labels.astype(np.float32))
    assert not output_done(tmp_path / "float.tif", (60, 80))
    assert not output_done(tmp_path / "missing.tif", (60, 80))


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(FineMaskError, match="cannot reach the Dask scheduler"), \
            open_client("tcp://127.0.0.1:1", timeout=1):
        pass


# ------------------------------------------------------------------------------- lazy reading


@pytest.mark.parametrize("layout", ["rgb-zlib", "rgb-raw", "gray16", "rgba-planar", "zarr-chw"])
def test_lazy_image_crops_equal_read_image(tmp_path, layout):
    img = scene(130, 170)
    path = tmp_path / "im.tif"
    if layout == "rgb-zlib":
        tifffile.imwrite(path, img, compression="zlib", rowsperstrip=16, photometric="rgb")
    elif layout == "rgb-raw":
        tifffile.imwrite(path, img, photometric="rgb")
    elif layout == "gray16":
        tifffile.imwrite(path, img[:, :, 1].astype(np.uint16) * 257, compression="zlib", tile=(64, 64))
    elif layout == "rgba-planar":
        rgba = np.concatenate([img, np.full((130, 170, 1), 255, np.uint8)], axis=2)
        tifffile.imwrite(path, np.moveaxis(rgba, -1, 0), photometric="rgb", planarconfig="separate",
                         extrasamples=["unassalpha"])
    else:
        zarr = pytest.importorskip("zarr")
        path = tmp_path / "im.zarr"
        z = zarr.create_array(str(path), shape=(3, 130, 170), chunks=(3, 64, 64), dtype="uint8")
        z[:] = np.moveaxis(img, -1, 0)
    expected = read_image(path) if layout != "zarr-chw" else img.astype(np.float32) / 255.0
    with LazyImage(path) as lazy:
        assert lazy.shape == (130, 170, 3)
        crop = lazy[37:101, 5:150]
        assert crop.shape == (64, 145, 3)
        scale = 255.0 if crop.dtype == np.uint8 else 65535.0
        np.testing.assert_array_equal(crop.astype(np.float32) / scale, expected[37:101, 5:150])
        view = lazy.crop((10, 120, 20, 160))
        np.testing.assert_array_equal(view[3:9, 7:30], lazy[13:19, 27:50])


def test_lazy_image_rejects_bad_files_naming_them(tmp_path):
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(FineMaskError, match="text.tif"):
        LazyImage(tmp_path / "text.tif")
    tifffile.imwrite(tmp_path / "big.tif", scene(40, 50), photometric="rgb")
    with pytest.raises(FineMaskError, match="more than the limit"):
        LazyImage(tmp_path / "big.tif", max_pixels=1000)


def test_tiled_refinement_equals_refine_labels_in_process(models, tmp_path):
    """The lazy path's class loop, arbitration and blending equal Refiner.refine_labels exactly."""
    seg, ref = engine_models(models)
    img = scene(300, 380)
    path = tmp_path / "im.tif"
    tifffile.imwrite(path, img, compression="zlib", rowsperstrip=23, photometric="rgb")
    yy, xx = np.mgrid[0:300, 0:380]
    labels = np.zeros((300, 380), np.uint8)
    labels[(yy - 120) ** 2 + (xx - 170) ** 2 < 80 ** 2] = 1
    labels[(yy > 215) & (xx > 250)] = 2
    with LazyImage(path) as lazy:
        coarse = segment_lazy(seg, lazy)
        probs = coarse.probs()
        assert probs.shape == (3, 300, 380)
        tiles = []
        base = local_tiles(lazy, ref)

        def counting(box, glob, batches):
            for batch, out in zip(batches, base(box, glob, batches)):
                tiles.extend(batch)
                yield out

        for sel, lab, pr in (("all", labels, probs), ("all", (labels == 1).astype(np.uint8), None)):
            tiles.clear()
            got = refine_labels_tiled(lazy, lab, pr, ref, L=L, selection=sel, batch_size=2, run_tiles=counting)
            want = ref.refine_labels(img, lab, None if pr is None else pr[:, :], L=L, selection=sel, batch_size=2)
            assert tiles  # the local step ran
            np.testing.assert_array_equal(got, want)
            assert (got != lab).any()  # and refinement changed something, so equality means something
        fast = refine_labels_tiled(lazy, labels, probs, ref, L=L, fast=True)
        np.testing.assert_array_equal(fast, ref.refine_labels(img, labels, probs[:, :], L=L, fast=True))
        local = refine_labels_tiled(lazy, labels, probs, ref, L=L, skip_global=True, selection="all")
        want = ref.refine_labels(img, labels, probs[:, :], L=L, skip_global=True, selection="all")
        np.testing.assert_array_equal(local, want)
        assert (local != labels).any()
        with pytest.raises(ValueError, match="exclude each other"):
            refine_labels_tiled(lazy, labels, probs, ref, L=L, fast=True, skip_global=True)
    # Coarse labels: the model on the image shrunk by area averaging instead of bilinear
    # antialiasing (engine.huge.segment_lazy); they differ only near class ties.
    agree = (coarse.labels() == seg.predict(img).labels).mean()
    assert agree > 0.9
    # At the working size no resizing happens: labels and probabilities equal predict's exactly.
    small = scene(48, 64, seed=2)
    coarse, result = segment_lazy(seg, small), seg.predict(small)
    np.testing.assert_array_equal(coarse.labels(), result.labels)
    np.testing.assert_array_equal(coarse.probs()[:, 5:30], result.probs[:, 5:30])


# ------------------------------------------------------------------------------- on the cluster


def test_cluster_results_equal_single_process_and_models_load_once_per_worker(models, client, tmp_path):
    src = make_folder(tmp_path / "in", 8)
    out = tmp_path / "out"
    config = BatchConfig(model=str(models[0]), refiner=str(models[1]), L=L, precision="float32")
    seen = []
    summary = run_batch(src, out, config, client=client, on_progress=lambda d, t, m: seen.append((d, t)))
    assert [r["status"] for r in summary.rows] == ["done"] * 8
    assert seen[-1] == (8, 8) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    seg, ref = engine_models(models)
    for p in sorted(src.iterdir()):
        got = read_labels(out / f"{p.stem}.tif")
        np.testing.assert_array_equal(got, reference(p, seg, ref, config), err_msg=p.name)
    rows = read_summary(out / "summary.csv")
    assert [r["file"] for r in rows] == sorted(p.name for p in src.iterdir())
    assert {r["status"] for r in rows} == {"done"} and all(float(r["seconds"]) > 0 for r in rows)
    loads = client.run(model_loads)
    assert len(loads) == 2
    for per_worker in loads.values():  # one load per worker process, not per image
        assert per_worker[f"segmenter:{models[0]}"] == 1 and per_worker[f"refiner:{models[1]}"] == 1

    # Re-run: everything skipped, files untouched. A deleted and a truncated output are redone.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    again = run_batch(src, out, config, client=client)
    assert {r["status"] for r in again.rows} == {"skipped"}
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    (out / "im0.tif").unlink()
    data = (out / "im1.tif").read_bytes()
    (out / "im1.tif").write_bytes(data[: len(data) // 2])
    third = run_batch(src, out, config, client=client)
    status = {r["file"]: r["status"] for r in third.rows}
    assert status.pop("im0.png") == "done" and status.pop("im1.tif") == "done"
    assert set(status.values()) == {"skipped"}
    np.testing.assert_array_equal(read_labels(out / "im1.tif"), reference(src / "im1.tif", seg, ref, config))


def test_cancel_stops_the_batch_and_a_rerun_finishes_it(models, client, tmp_path):
    src = make_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    config = BatchConfig(model=str(models[0]))
    done = []
    summary = run_batch(src, out, config, client=client, on_progress=lambda d, t, m: done.append(d),
                        cancel=lambda: bool(done))
    statuses = [r["status"] for r in summary.rows]
    assert summary.cancelled and "cancelled" in statuses and "done" in statuses
    assert {r["status"] for r in read_summary(out / "summary.csv")} >= {"cancelled", "done"}
    rest = run_batch(src, out, config, client=client)
    assert {r["status"] for r in rest.rows} <= {"done", "skipped"}
    assert only_outputs(out) == {f"{p.stem}.tif" for p in src.iterdir()} | {"summary.csv"}


def test_huge_tiff_refined_on_the_cluster_equals_one_machine(models, client, tmp_path):
    """A TIFF above huge_pixels: segmented from strips, its local-step tiles run on the workers.

    A 2-class segmenter keeps the test short (one class box is refined); the multi-class path of
    the same code is compared in-process above."""
    seg_dir = make_tiny_segmenter(tmp_path / "seg2", 2, (64, 48), seed=1)
    src = tmp_path / "in"
    src.mkdir()
    img = scene(480, 640, seed=3)
    tifffile.imwrite(src / "big.tif", img, compression="zlib", rowsperstrip=37, photometric="rgb")
    out = tmp_path / "out"
    config = BatchConfig(model=str(seg_dir), refiner=str(models[1]), L=L, precision="float32",
                         selection="all", tile_batch=2, huge_pixels=100_000)
    with distributed.get_task_stream(client) as stream:
        summary = run_batch(src, out, config, client=client)
    assert summary.rows[0]["status"] == "done", summary.rows
    tile_tasks = [t for t in stream.data if str(t["key"]).startswith("predict_tile_batch")]
    assert len({t["worker"] for t in tile_tasks}) == 2  # the tiles were spread over both workers
    seg, ref = engine_models((seg_dir, models[1]))
    with LazyImage(src / "big.tif") as lazy:
        coarse = segment_lazy(seg, lazy)
    labels = coarse.labels()
    assert len(np.unique(labels)) == 2
    want = ref.refine_labels(img, labels, coarse.probs()[:, :], L=L, selection="all", batch_size=2)
    got = read_labels(out / "big.tif")
    np.testing.assert_array_equal(got, want)
    assert (got != labels).any()

    # Local step only: each tile task gets its window of the full-resolution coarse mask.
    local = replace(config, skip_global=True)
    with distributed.get_task_stream(client) as stream:
        summary = run_batch(src, tmp_path / "out-local", local, client=client)
    assert summary.rows[0]["status"] == "done", summary.rows
    assert any(str(t["key"]).startswith("predict_tile_batch") for t in stream.data)
    want = ref.refine_labels(img, labels, coarse.probs()[:, :], L=L, selection="all", batch_size=2,
                             skip_global=True)
    got_local = read_labels(tmp_path / "out-local" / "big.tif")
    np.testing.assert_array_equal(got_local, want)
    assert (got_local != labels).any()
    with pytest.raises(FineMaskError, match="exclude each other"):
        BatchConfig(fast=True, skip_global=True).checked()


def test_zarr_folders_are_inputs_read_whole_or_in_parts(models, client, tmp_path):
    zarr = pytest.importorskip("zarr")
    src = tmp_path / "in"
    src.mkdir()
    small, big = scene(60, 80, seed=5), scene(120, 160, seed=6)
    for name, img in (("small.zarr", small), ("big.zarr", big)):
        z = zarr.create_array(str(src / name), shape=img.shape, chunks=(64, 64, 3), dtype="uint8")
        z[:] = img
    write_image(src / "small_png.png", small)
    out = tmp_path / "out"
    # big.zarr (19200 px) is above huge_pixels: segmented by a worker reading it in strips.
    summary = run_batch(src, out, BatchConfig(model=str(models[0]), huge_pixels=10_000), client=client)
    assert [r["status"] for r in summary.rows] == ["done"] * 3
    seg = Segmenter.from_pretrained(models[0])
    np.testing.assert_array_equal(read_labels(out / "small.tif"), read_labels(out / "small_png.tif"))
    np.testing.assert_array_equal(read_labels(out / "small.tif"), seg.predict(small).labels)
    with LazyImage(src / "big.zarr") as lazy:
        want = segment_lazy(seg, lazy).labels()
    np.testing.assert_array_equal(read_labels(out / "big.tif"), want)
    assert want.shape == big.shape[:2]


# ------------------------------------------------------------------------------- bad files


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming ``width`` x ``height`` (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _tiff_with_size(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD claims ``width`` x ``height`` 8-bit gray, 8 data bytes."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, typ, count, value) for tag, typ, count, value in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 16) + b"\0" * 8 + ifd


def _bad_file(kind: str, folder: Path, i: int) -> str:
    good = folder.parent / "good.tif"
    if not good.exists():
        tifffile.imwrite(good, scene(300, 400), compression="zlib", photometric="rgb")
    data = good.read_bytes()
    name, content = {
        "truncated-tif": (f"bad{i}.tif", data[: len(data) // 2]),
        "truncated-png": (f"bad{i}.png", _png_bytes()[:300]),
        "wrong-magic": (f"bad{i}.tif", b"GIF89a" + data[6:]),
        "empty": (f"bad{i}.jpg", b""),
        "text-png": (f"bad{i}.png", b"this is not an image\n"),
        "huge-png": (f"bad{i}.png", _png_with_size(200_000, 200_000)),
        "huge-tif": (f"bad{i}.tif", _tiff_with_size(100_000, 100_000)),
    }[kind]
    (folder / name).write_bytes(content)
    return name


def _png_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_image(Path(d) / "x.png", scene(60, 80)).read_bytes()


BAD_KINDS = ["truncated-tif", "truncated-png", "wrong-magic", "empty", "text-png", "huge-png", "huge-tif"]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.sampled_from(BAD_KINDS), min_size=1, max_size=4),
       sizes=st.lists(st.tuples(st.integers(8, 70), st.integers(8, 70)), min_size=1, max_size=3))
def test_bad_files_are_rows_and_good_ones_are_written(models, client, bad, sizes):
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        bad_names = [_bad_file(kind, src, i) for i, kind in enumerate(bad)]
        good = {}
        for i, (h, w) in enumerate(sizes):
            write_image(src / f"good{i}.png", scene(h, w, seed=i))
            good[f"good{i}.png"] = (h, w)
        # huge_pixels is small so the larger bad TIFFs also go through the read-in-parts path.
        summary = run_batch(src, out, BatchConfig(model=str(models[0]), huge_pixels=50_000), client=client)
        rows = {r["file"]: r for r in summary.rows}
        for name in bad_names:
            assert rows[name]["status"] == "failed" and name in rows[name]["error"], rows[name]
            assert not (out / f"{Path(name).stem}.tif").exists()
        for name, shape in good.items():
            assert rows[name]["status"] == "done"
            assert read_labels(out / f"{Path(name).stem}.tif").shape == shape
        written = {f"{Path(n).stem}.tif" for n in good} | {"summary.csv"}
        assert only_outputs(out) == written  # nothing partial, no temporaries
        failed = {r["file"] for r in read_summary(out / "summary.csv") if r["status"] == "failed"}
        assert failed == set(bad_names)


# ------------------------------------------------------------------------------- worker loss


def test_worker_killed_mid_run_loses_and_corrupts_nothing(models, client, tmp_path):
    """Kept last in this module: it kills one of the shared cluster's workers (its nanny restarts it)."""
    src = make_folder(tmp_path / "in", 10)
    out = tmp_path / "out"
    config = BatchConfig(model=str(models[0]), refiner=str(models[1]), L=L, precision="float32")
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    killed = {}

    def on_progress(done, total, message):
        if killed or done < 1:
            return
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed[busy[0]] = done

    summary = run_batch(src, out, config, client=client, on_progress=on_progress)
    assert killed and next(iter(killed.values())) < 10  # a worker died while images were left
    assert [r["status"] for r in summary.rows] == ["done"] * 10
    seg, ref = engine_models(models)
    for p in sorted(src.iterdir()):
        np.testing.assert_array_equal(read_labels(out / f"{p.stem}.tif"), reference(p, seg, ref, config))
    assert only_outputs(out) == {f"{p.stem}.tif" for p in src.iterdir()} | {"summary.csv"}
    client.wait_for_workers(2, timeout=60)
    assert set(client.scheduler_info(n_workers=-1)["workers"]) != before  # the killed one was replaced
