"""A store whose fine-tuned version has null scores in its card (a run whose validation labels
were all 255) must not stop the web app: it starts, lists the version and shows "n/a"."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

pytest.importorskip("gradio")
from web_testkit import running_app, tiny_models, web_config

from app.web.render import metrics_markdown
from engine.store import Store

NULL_SCORES = {"miou": None, "mba": None, "pairs": 2, "per_class_iou": {"class 1": None}}


def add_version(store_root, model, name, metrics):
    """A fine-tuned version in the store's models folder: ``model``'s weights with this card."""
    folder = store_root / "models" / name
    shutil.copytree(model, folder)
    card = json.loads((folder / "card.json").read_text())
    card.update(name=name, parent=str(model), metrics=metrics,
                training={**card.get("training", {}), "created": "2026-01-01T00:00:00"})
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_app_starts_and_lists_a_version_with_null_scores(tmp_path):
    seg, _ = tiny_models(tmp_path)
    store = Store.open(tmp_path / "store")
    add_version(store.root, seg, "tiny-ft1", {"before": {**NULL_SCORES, "miou": 20.0}, "after": NULL_SCORES})
    add_version(store.root, seg, "tiny-ft2", {"before": None, "after": {"miou": "?", "pairs": None}})
    with running_app(web_config(store.root, examples=[]), seg, None) as (demo, url):
        labels = dict((key, label) for label, key in demo.finemask.model_choices("segmentation"))
        assert "n/a" in labels["tiny-ft1"] and "20.0" in labels["tiny-ft1"]
        assert "tiny-ft2" in labels
        answer = httpx.post(f"{url}gradio_api/run/models", json={"data": []}, timeout=30)
        assert answer.status_code == 200
        assert {"tiny-ft1", "tiny-ft2"} <= set(answer.json()["data"][0]["segmentation"])
        config = httpx.get(f"{url}config", timeout=30).json()
        choices = [c for comp in config["components"] for c in comp.get("props", {}).get("choices") or []]
        assert any("tiny-ft1" in str(c) and "n/a" in str(c) for c in choices)


def test_metrics_table_shows_missing_scores_as_na():
    text = metrics_markdown({**NULL_SCORES, "miou": 20.0}, NULL_SCORES, "tiny-ft1")
    assert "| mIoU (%) | 20.0 | n/a |" in text and "| mBA (%) | n/a | n/a |" in text
    assert "| IoU class 1 | n/a | n/a |" in text
    text = metrics_markdown(None, {"miou": "?", "pairs": 3, "per_class_iou": None}, "v")
    assert "| mIoU (%) | n/a | n/a |" in text
    assert metrics_markdown(None, None, "v") == ""
