"""Every fine-tuned version has before/after scores, and one that scores below its parent is
flagged in the model lists (issue 35, item 13), through the web app's API and its model lists."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file
from web_testkit import running_app, save_png, scene, tiny_models, web_config

from app.web.render import metrics_markdown
from app.web.session import Workbench
from app.workbench import BELOW_PARENT
from engine.checkpoints import record_metrics
from engine.io import write_labels
from engine.store import Store
from engine.versions import models_dir
from training.tiny import make_tiny_segmenter


def test_a_store_without_validation_pairs_still_scores_the_new_version(tmp_path):
    seg, ref = tiny_models(tmp_path)
    with running_app(web_config(tmp_path / "store"), seg, ref) as (demo, url):
        client = Client(url, verbose=False)
        labels = np.zeros((48, 72), np.uint8)
        labels[:, 40:] = 1
        write_labels(tmp_path / "labels.tif", labels)
        for seed in (1, 2):
            image = save_png(tmp_path / f"scene{seed}.png", scene(seed=seed))
            client.predict(image=handle_file(image), labels=handle_file(tmp_path / "labels.tif"), api_name="/save")
        store = demo.finemask.store
        assert len(store.pairs("train")) == 2 and not store.pairs("validation")

        result = client.predict(base="tiny", steps=2, minutes=0, api_name="/finetune")
        assert result["finished"]
        for scores in (result["before"], result["after"]):
            assert scores["validation"] == "held-back strip" and scores["pairs"] == 2
            assert scores["miou"] is not None and scores["pixel_accuracy"] is not None
        table = metrics_markdown(result["before"], result["after"], result["name"])
        assert "held-back strip of each of 2 training pairs" in table and "| mIoU (%) |" in table
        label = dict((key, text) for text, key in demo.finemask.model_choices("segmentation"))[result["name"]]
        assert f"mIoU {result['before']['miou']:.1f} → {result['after']['miou']:.1f}" in label


def test_versions_below_their_parent_are_flagged_in_every_model_list(tmp_path):
    seg, ref = tiny_models(tmp_path)
    store = Store.open(tmp_path / "store")
    scores = {"tiny-ft1": (77.2, 46.5), "tiny-ft2": (46.5, 60.0)}  # pixel accuracy before -> after
    for name, (before, after) in scores.items():
        folder = make_tiny_segmenter(models_dir(store) / name, name=name)
        record_metrics(folder, "before", {"miou": before / 2, "pixel_accuracy": before, "pairs": 1})
        record_metrics(folder, "after", {"miou": after / 2, "pixel_accuracy": after, "pairs": 1})
    bench = Workbench(web_config(store.root), model=seg, refiner=ref)
    try:
        labels = dict((key, text) for text, key in bench.model_choices("segmentation"))
        assert labels["tiny-ft1"].endswith(BELOW_PARENT) and "mIoU 38.6 → 23.2" in labels["tiny-ft1"]
        assert BELOW_PARENT not in labels["tiny-ft2"] and BELOW_PARENT not in labels["tiny"]
        entry = bench.catalog.entry("tiny-ft1", "segmentation")
        table = metrics_markdown(entry.card.metrics["before"], entry.card.metrics["after"], "tiny-ft1")
        assert BELOW_PARENT in table and "| pixel accuracy (%) | 77.2 | 46.5 |" in table
    finally:
        bench.close()
