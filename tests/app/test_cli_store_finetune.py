"""``finemask store`` and ``finemask finetune`` on a tiny model and a small store."""
from __future__ import annotations

import numpy as np

from app.cli import main
from engine.checkpoints import read_card
from engine.io import write_image, write_labels
from engine.store import Store
from engine.versions import list_versions
from training.tiny import make_tiny_segmenter


def _pairs(folder, n=5):
    rng = np.random.default_rng(0)
    (folder / "labels").mkdir(parents=True)
    images = []
    for i in range(n):
        labels = np.zeros((40, 56), np.uint8)
        labels[5 + i : 25, 10 : 40 - i] = 1
        noise = rng.integers(0, 20, (40, 56, 3), dtype=np.uint8)
        image = np.where(labels[..., None] == 1, 220, 40).astype(np.uint8) + noise
        images.append(write_image(folder / f"im{i}.png", image))
        write_labels(folder / "labels" / f"im{i}.png", labels)
    return images


def test_store_add_info_classes_and_finetune(tmp_path, capsys):
    images = _pairs(tmp_path / "data")
    store_dir = tmp_path / "store"
    stray = tmp_path / "data" / "nolabels.png"
    write_image(stray, np.zeros((8, 8, 3), np.uint8))
    code = main(["store", "add", str(store_dir), *map(str, images), str(stray),
                 "--labels", str(tmp_path / "data" / "labels")])
    out = capsys.readouterr().out
    assert code == 1 and out.count("added ") == 5 and "nolabels" in out  # one clear skip, the rest added
    assert main(["store", "classes", str(store_dir), "ground", "thing"]) == 0
    store = Store.open(store_dir, create=False)
    assert len(store) == 5 and store.class_names == ["ground", "thing"]
    assert main(["store", "info", str(store_dir)]) == 0
    assert "4 train, 1 validation" in capsys.readouterr().out

    base = make_tiny_segmenter(tmp_path / "base", num_classes=2, input_size=(32, 24))
    code = main(["finetune", str(store_dir), "--base", str(base), "--steps", "4", "--batch-size", "2",
                 "--crop", "64", "64", "--name", "mine", "--input-size", "40", "30"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote" in out and "miou" in out
    (name, folder, card), = list_versions(store)
    assert name == "mine" and read_card(folder).classes == ["ground", "thing"] and card.training["steps"] == 4
    assert card.input_size == [40, 30]  # the new working size


def test_finetune_errors_are_one_line(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "nowhere")]) == 2
    assert "not a FineMask annotation store" in capsys.readouterr().err
