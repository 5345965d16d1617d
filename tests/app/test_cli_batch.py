"""``finemask batch``: a folder on a Dask cluster; outputs equal the engine, bad files are reported."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from app.cli import main
from engine.batch import read_summary
from engine.io import read_image, read_labels, write_image
from engine.refine import Refiner
from engine.refine_modes import DEFAULT_MODE, mode_options
from engine.segment import Segmenter
from training.tiny import make_tiny_refiner, make_tiny_segmenter

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "seg", 3, (64, 48)), make_tiny_refiner(root / "ref")


@pytest.fixture(scope="module")
def scheduler():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()


def _folder(tmp_path, n=4):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(folder / f"img{i}.png", rng.integers(0, 256, size=(40 + 9 * i, 60, 3), dtype=np.uint8))
    return folder


def test_batch_on_a_running_cluster_reports_bad_files_and_resumes(tmp_path, models, scheduler, capsys):
    seg_dir, ref_dir = models
    folder = _folder(tmp_path)
    (folder / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    args = ["batch", str(folder), str(out), "--model", str(seg_dir), "--refine", "--refiner", str(ref_dir),
            "--L", "128", "--scheduler", scheduler]
    assert main(args) == 1  # one image failed; the others were written
    captured = capsys.readouterr()
    assert "broken.png" in captured.out and "4 done, 0 skipped, 1 failed of 5" in captured.out
    assert "Traceback" not in captured.err
    rows = {r["file"]: r for r in read_summary(out / "summary.csv")}
    assert rows["broken.png"]["status"] == "failed" and "broken.png" in rows["broken.png"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["img0.tif", "img1.tif", "img2.tif", "img3.tif", "summary.csv"]
    seg = Segmenter.from_pretrained(seg_dir)
    ref = Refiner.from_pretrained(ref_dir, device="cpu")
    for i in range(4):
        image = folder / f"img{i}.png"
        result = seg.predict(image)
        want = ref.refine_labels(read_image(image), result.labels, result.probs, L=128,
                                 **mode_options(DEFAULT_MODE))  # batch's default mode
        np.testing.assert_array_equal(read_labels(out / f"img{i}.tif"), want)

    (folder / "broken.png").unlink()
    assert main(args) == 0  # nothing left to do: everything skipped
    assert "0 done, 4 skipped, 0 failed of 4" in capsys.readouterr().out

    local = tmp_path / "local"  # local step only, on the segmentation as it is
    assert main([*args[:2], str(local), *args[3:], "--skip-global"]) == 0
    for i in range(4):
        result = seg.predict(folder / f"img{i}.png")
        want = ref.refine_labels(read_image(folder / f"img{i}.png"), result.labels, result.probs, L=128,
                                 skip_global=True)
        np.testing.assert_array_equal(read_labels(local / f"img{i}.tif"), want)


def test_batch_starts_its_own_local_cluster(tmp_path, models, capsys):
    folder = _folder(tmp_path, 3)
    out = tmp_path / "out"
    code = main(["batch", str(folder), str(out), "--model", str(models[0]), "--workers", "1",
                 "--threads-per-worker", "1"])
    assert code == 0
    assert "3 done" in capsys.readouterr().out
    seg = Segmenter.from_pretrained(models[0])
    for i in range(3):
        np.testing.assert_array_equal(read_labels(out / f"img{i}.tif"), seg.predict(folder / f"img{i}.png").labels)


def test_batch_errors_are_one_line(tmp_path, models, capsys):
    assert main(["batch", str(tmp_path / "missing"), str(tmp_path / "out"), "--model", str(models[0])]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not found" in err and "Traceback" not in err
    folder = _folder(tmp_path, 1)
    assert main(["batch", str(folder), str(folder), "--model", str(models[0])]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["batch", str(folder), str(tmp_path / "o"), "--model", str(tmp_path / "nomodel")]) == 2
    assert "no such model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
