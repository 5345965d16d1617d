"""The web app end to end through gradio_client, against a server on a free loopback port."""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from web_testkit import running_app, save_png, scene, tiny_models, web_config

from engine.io import read_image, read_labels, write_labels
from engine.store import Store


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-api")
    seg, ref = tiny_models(folder)
    config = web_config(folder / "store")
    with running_app(config, seg, ref) as (demo, url):
        yield demo, url, folder


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def test_segment_refine_save_finetune_download(server, client, tmp_path, monkeypatch):
    demo = server[0]
    bench = demo.finemask
    image = save_png(tmp_path / "scene.png", scene())

    # segment: overlay at display size, labels as TIFF and palette PNG at full size
    overlay, tif, png, uncertainty, info = client.predict(image=handle_file(image), model="tiny", working_size=64,
                                                          api_name="/segment")
    labels = read_labels(tif)
    assert labels.shape == (48, 72)
    assert labels.max() < 3
    np.testing.assert_array_equal(read_labels(png), labels)
    assert Image.open(png).mode == "P"
    assert Image.open(overlay).size == (72, 48) and Image.open(uncertainty).size == (72, 48)
    assert info["model"] == "tiny" and info["origin"] == "predicted" and info["width"] == 72
    assert sum(info["classes"].values()) == pytest.approx(100, abs=0.1)

    # refine (full): same size, only classes that were present, origin recorded
    _, rtif, _, _, rinfo = client.predict(image=handle_file(image), labels=handle_file(tif), mode="full",
                                          api_name="/refine")
    refined = read_labels(rtif)
    assert refined.shape == labels.shape
    assert set(np.unique(refined)) <= set(np.unique(labels))
    assert rinfo["origin"] == "refined"
    # refine (local: full-resolution tiles on the labels as they are): the engine's skip_global run
    refiner, seen = bench.refiner_for(None), []
    original = refiner.refine_labels
    monkeypatch.setattr(refiner, "refine_labels", lambda *a, **k: seen.append(k) or original(*a, **k))
    _, ltif, _, _, _ = client.predict(image=handle_file(image), labels=handle_file(tif), mode="local",
                                      api_name="/refine")
    assert seen[-1]["skip_global"] and not seen[-1]["fast"]
    want = original(read_image(image), labels, None, skip_global=True)
    np.testing.assert_array_equal(read_labels(ltif), want)
    with pytest.raises(AppError, match="refinement mode must be one of full, fast, local"):
        client.predict(image=handle_file(image), labels=handle_file(tif), mode="quick", api_name="/refine")

    # save an edited mask: the store holds exactly these labels, and the model's class names
    edited = labels.copy()
    edited[10:30, 5:40] = 2
    write_labels(tmp_path / "edited.tif", edited)
    saved = client.predict(image=handle_file(image), labels=handle_file(tmp_path / "edited.tif"), api_name="/save")
    store = Store.open(bench.store.root, create=False)
    assert saved["pair_id"] in store
    _, stored = store.load(saved["pair_id"])
    np.testing.assert_array_equal(stored, edited)
    assert store.get(saved["pair_id"]).origin == "corrected"
    assert store.class_names == ["class 0", "class 1", "class 2"]
    # saving the same image again updates its pair instead of adding a second one
    again = client.predict(image=handle_file(image), labels=handle_file(tmp_path / "edited.tif"), api_name="/save")
    assert again["pair_id"] == saved["pair_id"] and again["pairs"] == saved["pairs"]
    # undo of the last save (/undo with the id /save returned): the pair goes back one version
    worse = edited.copy()
    worse[:5] = 1
    write_labels(tmp_path / "worse.tif", worse)
    client.predict(image=handle_file(image), labels=handle_file(tmp_path / "worse.tif"), api_name="/save")
    np.testing.assert_array_equal(store.load(saved["pair_id"])[1], worse)
    undone = client.predict(pair_id=saved["pair_id"], api_name="/undo")
    assert undone["pair_id"] == saved["pair_id"] and undone["versions_left"] == 1
    np.testing.assert_array_equal(store.load(saved["pair_id"])[1], edited)

    # two more pairs so that the store has training pairs (splits follow the image hash)
    for seed in (1, 2, 3):
        other = save_png(tmp_path / f"scene{seed}.png", scene(seed=seed))
        client.predict(image=handle_file(other), labels=handle_file(tmp_path / "edited.tif"), api_name="/save")
    assert store.pairs("train")

    # fine-tune the tiny model: a new version with before/after scores, offered by /models and usable
    result = client.predict(base="tiny", steps=2, minutes=0, api_name="/finetune")
    assert result["finished"] and result["name"] == "tiny-ft1" and result["steps"] == 2
    assert set(result["before"]) >= {"miou", "mba", "pairs"}
    assert result["after"]["pairs"] == result["before"]["pairs"]
    models = client.predict(api_name="/models")
    assert "tiny-ft1" in models["segmentation"] and models["default_model"] == "tiny"
    _, tif2, _, _, info2 = client.predict(image=handle_file(image), model="tiny-ft1", working_size=64,
                                          api_name="/segment")
    assert info2["model"] == "tiny-ft1" and read_labels(tif2).shape == (48, 72)


def test_unknown_model_is_a_clear_error(client, tmp_path):
    image = save_png(tmp_path / "scene.png", scene())
    with pytest.raises(AppError, match="unknown segmentation model 'nope'.*available: .*tiny"):
        client.predict(image=handle_file(image), model="nope", working_size=64, api_name="/segment")
    # a server-side path is not a model name: clients cannot make the server load arbitrary folders
    with pytest.raises(AppError, match="unknown"):
        client.predict(image=handle_file(image), model=str(Path.cwd()), working_size=64, api_name="/segment")


def test_queue_runs_one_job_at_a_time_and_cancel_stops_finetuning(server, tmp_path):
    demo, url, _ = server
    bench = demo.finemask
    image = save_png(tmp_path / "scene.png", scene())
    if not bench.store.pairs("train"):  # this test may run alone
        labels = np.zeros((48, 72), np.uint8)
        labels[:, 36:] = 1
        for seed in (1, 2, 3, 4):
            bench.store.add(scene(seed=seed), labels, "corrected")
    versions_before = sorted(p.name for p in (bench.store.root / "models").glob("*") if not p.name.startswith("."))

    trainer, other = Client(url, verbose=False), Client(url, verbose=False)
    job = trainer.submit(base="tiny", steps=2000, minutes=0, api_name="/finetune")  # the server's cap
    deadline = time.monotonic() + 60
    while not (job.status().progress_data or job.done()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.done(), "a 2000-step fine-tuning finished before it could be cancelled"

    # the only job slot is taken: another user's segmentation waits in the queue
    waiting = other.submit(image=handle_file(image), model="tiny", working_size=64, api_name="/segment")
    time.sleep(1.0)
    assert not waiting.done()

    assert trainer.predict(api_name="/cancel") == {"cancelled": True}
    result = job.result(timeout=60)
    assert result["finished"] is False and result["name"] is None and result["steps"] < 2000
    versions_after = sorted(p.name for p in (bench.store.root / "models").glob("*") if not p.name.startswith("."))
    assert versions_after == versions_before
    # once the slot is free the queued job runs
    assert read_labels(waiting.result(timeout=60)[1]).shape == (48, 72)
    # a cancel with nothing running says so
    assert trainer.predict(api_name="/cancel") == {"cancelled": False}


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_files_are_served_only_from_the_apps_own_folders(server):
    demo, url, _ = server
    store_manifest = demo.finemask.store.root / "manifest.json"
    assert store_manifest.is_file()
    assert _get(f"{url}gradio_api/file=/etc/passwd") == 403
    assert _get(f"{url}gradio_api/file={store_manifest}") == 403
    assert _get(f"{url}gradio_api/file={Path(__file__).resolve()}") == 403
    sample = demo.finemask.config.examples[0]
    assert _get(f"{url}gradio_api/file={sample.resolve()}") == 200


def page_handler(demo, name: str):
    """The function behind one of the page's (private) events, as Gradio calls it."""
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__name__", "") == name:
            return block_fn.fn
    raise KeyError(name)


class FakeRequest:
    session_hash = "page-test"


def test_page_handlers_apply_edits_save_and_list_new_versions(server, tmp_path):
    """The page's own events (not the API): upload, segment, paint, save, fine-tune."""
    demo, _, _ = server
    bench = demo.finemask
    page = demo.finemask_page
    work_of, status_of = page["work"], page["status"]
    image = save_png(tmp_path / "page.png", scene(seed=7))
    outputs = page_handler(demo, "on_upload")(str(image), None)
    work = outputs[work_of]
    assert work.name == "page" and work.labels is None and "Image loaded" in outputs[status_of]
    outputs = page_handler(demo, "on_segment")(work, "tiny", 64, FakeRequest())
    work, legend, editor = outputs[work_of], outputs[page["legend"]], outputs[page["editor"]]
    assert work.labels.shape == (48, 72) and "class" in legend
    background = editor.value["background"]  # the editor shows the overlay, at most editor_max_side
    assert background is not None and not editor.value["layers"]

    # paint class 2 over a box of the editor's (here full-size) image, then Save
    colour = bench.brush_colours(work)[2]
    layer = np.zeros((48, 72, 4), np.uint8)
    layer[5:15, 10:30] = (*colour, 140)  # semi-transparent paint
    outputs = page_handler(demo, "on_save")(work, {"background": None, "layers": [layer], "composite": None},
                                            FakeRequest())
    work = outputs[work_of]
    assert (work.labels[5:15, 10:30] == 2).all() and work.origin == "corrected"
    assert "saved as pair `page`" in outputs[status_of]
    _, stored = bench.store.load("page")
    np.testing.assert_array_equal(stored, work.labels)
    files = outputs[page["downloads"]]
    np.testing.assert_array_equal(read_labels(files[0]), work.labels)

    # paint and save again, then Undo last save: the labels and the stored pair go back
    first_saved = work.labels.copy()
    layer[:] = 0
    layer[30:40, 40:60] = (*colour, 255)
    work = page_handler(demo, "on_save")(work, {"background": None, "layers": [layer], "composite": None},
                                         FakeRequest())[work_of]
    assert (bench.store.load("page")[1][30:40, 40:60] == 2).all()
    outputs = page_handler(demo, "on_undo")(work, FakeRequest())
    work = outputs[work_of]
    np.testing.assert_array_equal(work.labels, first_saved)
    np.testing.assert_array_equal(bench.store.load("page")[1], first_saved)
    assert "Last save undone" in outputs[status_of]

    # fine-tune from the page: the model lists offer the new version
    while not bench.store.pairs("train"):
        bench.store.add(scene(seed=len(bench.store) + 20), work.labels, "corrected")
    outputs = page_handler(demo, "on_finetune")("tiny", 2, 0, FakeRequest())
    text, model_dd, refiner_dd, base_dd = (outputs[page[k]] for k in ("ft_result", "model", "refiner", "ft_base"))
    new = [key for _, key in model_dd.choices if key.startswith("tiny-ft")]
    assert new and new[-1] in text
    assert [key for _, key in base_dd.choices if key == new[-1]]
    assert all(key != new[-1] for _, key in refiner_dd.choices)  # a segmentation model is no refiner
