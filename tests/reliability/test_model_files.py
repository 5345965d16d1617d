"""Model files: only safetensors + JSON cards load; anything else is a clear FineMaskError.

- A folder (or file) of pickled weights (.pth/.pt/.bin) is refused without unpickling, with a
  hint how to convert; a damaged model.safetensors, a card that is not JSON, lacks fields, has
  fields of the wrong type, names another task or architecture, or has a config the tensors do
  not fit, and tensors of the wrong shape or missing: each a FineMaskError naming the file.
- ``Refiner.from_official_checkpoint`` reads with ``weights_only=True``: a malicious pickle is
  refused and its code never runs; a plain official-layout state dict loads.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from engine.checkpoints import CARD_FILE, WEIGHTS_FILE
from engine.errors import FineMaskError
from engine.refine import Refiner
from engine.segment import Segmenter

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
LOADERS = {"segmenter": Segmenter.from_pretrained, "refiner": lambda p: Refiner.from_pretrained(p, device="cpu")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    root = tmp_path_factory.mktemp("models")
    return {"segmenter": make_tiny_segmenter(root / "seg", 3, (32, 24)), "refiner": make_tiny_refiner(root / "ref")}


@pytest.fixture(scope="module")
def inference_keys(models) -> dict[str, set[str]]:
    """Tensor names each loader uses (a segmenter checkpoint also holds its training branches)."""
    return {"segmenter": set(Segmenter.from_pretrained(models["segmenter"], device="cpu").model.state_dict()),
            "refiner": set(load_file(str(models["refiner"] / WEIGHTS_FILE)))}


def copy_model(src: Path, root: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=root)) / "model"
    shutil.copytree(src, folder)
    return folder


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(load, folder: Path, problem: str, named: Path | None = None) -> FineMaskError:
    """``load(folder)`` raises a FineMaskError naming ``named`` (default: the folder) and the problem."""
    before = listing(folder) if folder.is_dir() else None
    with pytest.raises(FineMaskError) as info:
        load(folder)
    text = str(info.value)
    assert str(named or folder) in text, f"error does not name {named or folder}: {text}"
    assert re.search(problem, text), f"/{problem}/ not in: {text}"
    if before is not None:
        assert listing(folder) == before, "loading changed the model folder"
    return info.value


# --- pickles are never loaded from model folders --------------------------------------------------


@pytest.mark.parametrize("kind", ["segmenter", "refiner"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickled_weights_are_refused_with_a_conversion_hint(tmp_path, monkeypatch, models, kind, suffix):
    state = load_file(str(models[kind] / WEIGHTS_FILE))
    folder = tmp_path / "downloaded"
    folder.mkdir()
    torch.save(state, folder / f"model{suffix}")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on a model folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    hint = r"only model\.safetensors \+ card\.json.*Refiner\.from_official_checkpoint"
    assert_refused(LOADERS[kind], folder, rf"not a FineMask model folder.*model{suffix}.*{hint}")
    assert_refused(LOADERS[kind], folder / f"model{suffix}", rf"pickled PyTorch weights file.*{hint}")
    (folder / CARD_FILE).write_text((models[kind] / CARD_FILE).read_text())  # a card alone does not help
    assert_refused(LOADERS[kind], folder, "needs model.safetensors and card.json")


# --- damaged model.safetensors ---------------------------------------------------------------------


@st.composite
def damaged_weights(draw, data: bytes) -> tuple[str, bytes, bool]:
    """(what, bytes, may_load): truncated, header bytes changed, or not safetensors at all."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    how = draw(st.sampled_from(["truncated", "header", "garbage", "pickle", "empty"]))
    if how == "truncated":
        cut = draw(st.integers(0, len(data) - 1))
        return f"cut to {cut} of {len(data)} bytes", data[:cut], False
    if how == "header":
        bad = bytearray(data)
        positions = draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=3, unique=True))
        for pos in positions:
            bad[pos] ^= draw(st.integers(1, 255))
        return f"header bytes {positions} changed", bytes(bad), True  # e.g. a space becoming a tab
    if how == "garbage":
        return "random bytes", draw(st.binary(min_size=1, max_size=200)), False
    if how == "pickle":
        return "a pickle named model.safetensors", pickle.dumps({"w": [1.0, 2.0]}), False
    return "0 bytes", b"", False


@pytest.mark.parametrize("kind", ["segmenter", "refiner"])
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_damaged_weights_file_is_a_clear_error(tmp_path, models, kind, data):
    original = (models[kind] / WEIGHTS_FILE).read_bytes()
    what, damaged, may_load = data.draw(damaged_weights(original))
    folder = copy_model(models[kind], tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(damaged)
    try:
        LOADERS[kind](folder)
    except FineMaskError as exc:
        assert str(folder) in str(exc), str(exc)
        event(f"{what.split()[0]}: FineMaskError")
    else:
        assert may_load, f"{what}: loaded"
        event(f"{what.split()[0]}: loaded (the change kept a valid file)")


# --- cards ------------------------------------------------------------------------------------------

OTHER_TYPE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                       st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TYPES = {"name": str, "task": str, "architecture": str, "config": dict, "classes": list, "palette": list,
         "metrics": dict, "training": dict, "created": str, "input_size": list, "parent": str, "format_version": int}
#: Config fields whose change the tensors cannot fit, with values to try.
SEGMENTER_WIDTHS = {"num_classes": st.integers(1, 12), "aspp_channels": st.integers(1, 40),
                    "decoder_channels": st.integers(1, 40), "low_level_channels": st.integers(1, 20),
                    "encoder": st.sampled_from(["resnet18"]), "decoder": st.sampled_from(["dupsampling"])}
REFINER_WIDTHS = {"psp_channels": st.integers(1, 40), "head_channels": st.integers(1, 20),
                  "stage_channels": st.lists(st.integers(1, 32), min_size=4, max_size=4),
                  "decoder_channels": st.lists(st.integers(1, 16), min_size=3, max_size=3),
                  "stage_blocks": st.lists(st.integers(1, 2), min_size=4, max_size=4)}


def wrong_type(expected: type) -> st.SearchStrategy:
    def differs(v) -> bool:
        if expected is int:
            return not isinstance(v, int) or isinstance(v, bool)
        return not isinstance(v, expected)

    return OTHER_TYPE.filter(differs)


@st.composite
def bad_cards(draw, card: dict, kind: str) -> tuple[str, str, str]:
    """(what, card.json text, problem regex) for a card the loader must refuse."""
    how = draw(st.sampled_from(["not json", "not an object", "missing", "wrong type", "other task",
                                "other architecture", "config", "unknown config field", "class names"]))
    card = json.loads(json.dumps(card))
    if how == "not json":
        text = draw(st.text(min_size=0, max_size=40).filter(lambda t: not _is_json(t)))
        return how, text, "not readable JSON"
    if how == "not an object":
        return how, json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                                              st.none()))), "not a JSON object"
    if how == "missing":
        gone = draw(st.lists(st.sampled_from(["name", "task", "architecture", "config"]), min_size=1, unique=True))
        for key in gone:
            del card[key]
        return f"{how} {gone}", json.dumps(card), "lacks the field"
    if how == "wrong type":
        key = draw(st.sampled_from(sorted(TYPES)))
        card[key] = draw(wrong_type(TYPES[key]).filter(lambda v: v is not None or key not in ("parent", "input_size")))
        return f"{key} = {card[key]!r}", json.dumps(card), "model card is invalid"
    if how == "other task":
        card["task"] = "refinement" if kind == "segmenter" else "segmentation"
        return how, json.dumps(card), "not a (segmentation|refinement)|not a .*architecture"
    if how == "other architecture":
        card["architecture"] = draw(st.sampled_from(["cascadepsp" if kind == "segmenter" else "dsrl", "unet", ""]))
        return f"architecture {card['architecture']!r}", json.dumps(card), "architecture"
    if how == "config":
        widths = SEGMENTER_WIDTHS if kind == "segmenter" else REFINER_WIDTHS
        key = draw(st.sampled_from(sorted(widths)))
        value = draw(widths[key].filter(lambda v: v != resolved_config(card, kind)[key]))
        card["config"][key] = value
        if key == "num_classes":
            card["classes"] = [f"c{i}" for i in range(value)]
            card["palette"] = [[0, 0, 0]] * value
        return f"config {key} = {value!r}", json.dumps(card), "do not (match|fit)|wrong shapes|config"
    if how == "unknown config field":
        card["config"][draw(st.sampled_from(["widht", "num_class", "layers"]))] = 3
        return how, json.dumps(card), "config"
    if kind == "refiner":  # refiners have no classes: a class-count mismatch only exists for segmenters
        card["task"] = "detection"
        return "task 'detection'", json.dumps(card), "unknown task 'detection'"
    n = len(card["classes"])
    card["classes"] = [f"c{i}" for i in range(draw(st.integers(1, 8).filter(lambda v: v != n)))]
    return "class names", json.dumps(card), "class names for a model of 3 classes"


def resolved_config(card: dict, kind: str) -> dict:
    """The card's config with every preset filled in (what the loader builds)."""
    if kind == "segmenter":
        return card["config"]
    from engine.models.cascadepsp import RefinerConfig

    return RefinerConfig.from_dict(card["config"]).resolved().to_dict()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("kind", ["segmenter", "refiner"])
@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_bad_card_is_a_clear_error(tmp_path, models, kind, data):
    card = json.loads((models[kind] / CARD_FILE).read_text())
    what, text, problem = data.draw(bad_cards(card, kind))
    folder = copy_model(models[kind], tmp_path)
    (folder / CARD_FILE).write_text(text)
    assert_refused(LOADERS[kind], folder, problem)
    event(f"{what.split(' =')[0].split(' [')[0]}: FineMaskError")


def test_card_regressions(tmp_path, models):
    """Cards that loaded, or escaped as other exceptions, before engine.checkpoints checked them."""
    ref = json.loads((models["refiner"] / CARD_FILE).read_text())
    seg = json.loads((models["segmenter"] / CARD_FILE).read_text())
    cases = [
        ("refiner", {**ref, "config": [1, 2]}, "config must be a dict"),  # was AttributeError
        ("segmenter", {**seg, "architecture": "unet"}, "'unet' is not a segmentation architecture"),  # was loaded
        ("refiner", {**ref, "task": "segmentation"}, "'cascadepsp' is not a segmentation architecture"),
        ("segmenter", {**seg, "classes": ["a", "b"]}, "2 class names for a model of 3 classes"),  # was loaded
        ("segmenter", {**seg, "palette": [[0, 0]] * 3}, r"palette must be a list of \[r, g, b\]"),
        ("segmenter", {**seg, "input_size": [0, 24]}, "input_size must be"),  # was loaded: working size 24
        ("segmenter", {**seg, "format_version": 99}, "format_version 99"),
        ("refiner", {**ref, "task": "detection"}, "unknown task 'detection'"),  # was loaded as a refiner
    ]
    for kind, card, problem in cases:
        folder = copy_model(models[kind], tmp_path)
        (folder / CARD_FILE).write_text(json.dumps(card))
        assert_refused(LOADERS[kind], folder, problem, named=folder / CARD_FILE)


# Impossible or absurd widths: the loaders build on the meta device first, so these are refused
# without allocating the memory they claim (they used to escape as RuntimeError / IndexError).
ABSURD = [
    ("segmenter", {"aspp_channels": 10**9}),
    ("refiner", {"psp_channels": 10**9}),
    ("refiner", {"stage_channels": [8, -1, 16, 24]}),
    ("refiner", {"stage_channels": [8, 16, 24]}),
]


@pytest.mark.parametrize("kind,change", ABSURD, ids=[f"{k}-{next(iter(c))}" for k, c in ABSURD])
def test_impossible_config_is_a_clear_error(tmp_path, models, kind, change):
    folder = copy_model(models[kind], tmp_path)
    card = json.loads((folder / CARD_FILE).read_text())
    card["config"].update(change)
    (folder / CARD_FILE).write_text(json.dumps(card))
    assert_refused(LOADERS[kind], folder, "config|do not (match|fit)|wrong shapes")


# --- tensors that do not fit the card ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmenter", "refiner"])
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_tensors_that_do_not_fit_the_card(tmp_path, models, inference_keys, kind, data):
    state = load_file(str(models[kind] / WEIGHTS_FILE))
    inference = inference_keys[kind]
    keys = sorted(k for k in state if k in inference and state[k].ndim >= 1 and not k.endswith("num_batches_tracked"))
    how = data.draw(st.sampled_from(["shape", "missing"] + (["extra"] if kind == "refiner" else [])))
    key = data.draw(st.sampled_from(keys))
    if how == "shape":
        shape = list(state[key].shape)
        axis = data.draw(st.integers(0, len(shape) - 1))
        shape[axis] += data.draw(st.sampled_from([-1, 1, 5])) if shape[axis] > 1 else 1
        state[key] = torch.zeros(shape)
        problem = rf"{re.escape(key)} \(.*\) vs"
    elif how == "missing":
        del state[key]
        problem = rf"missing.*{re.escape(key)}" if kind == "segmenter" else "missing"
    else:
        state["extra.weight"] = torch.zeros(3)
        problem = "unexpected.*extra.weight"
    folder = copy_model(models[kind], tmp_path)
    save_file(state, str(folder / WEIGHTS_FILE))
    assert_refused(LOADERS[kind], folder, problem)
    event(f"{how}: FineMaskError")


def test_segmenter_refuses_tensors_of_no_branch(tmp_path, models):
    state = load_file(str(models["segmenter"] / WEIGHTS_FILE))
    state["not_a_layer.weight"] = torch.zeros(3)
    folder = copy_model(models["segmenter"], tmp_path)
    save_file(state, str(folder / WEIGHTS_FILE))
    assert_refused(LOADERS["segmenter"], folder, "not_a_layer")


# --- official CascadePSP checkpoints: torch.load(weights_only=True) --------------------------------


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    evil = tmp_path / "cascadepsp_model.pth"
    marker = tmp_path / "pwned"
    torch.save({"feats.conv1.weight": torch.zeros(1), "payload": Payload(marker)}, evil)
    assert_refused(lambda p: Refiner.from_official_checkpoint(p, device="cpu"), evil, "not a loadable PyTorch weights")
    assert not marker.exists()
    from app.cli import main  # the same file given to the CLI as --model
    from engine.io import write_image, write_labels

    image = tmp_path / "im.png"
    write_image(image, np.zeros((16, 16, 3), np.uint8))
    write_labels(tmp_path / "mask.png", np.zeros((16, 16), np.uint8))
    out = tmp_path / "out.png"
    code = main(["refine", str(image), str(tmp_path / "mask.png"), "-o", str(out), "--model", str(evil)])
    err = capsys.readouterr().err
    assert code == 2 and evil.name in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out.png").exists()
    # the payload is real: unpickled without weights_only it does create the marker
    other = tmp_path / "proof"
    torch.save(Payload(other), tmp_path / "proof.pth")
    torch.load(tmp_path / "proof.pth", weights_only=False)
    assert other.exists()


def test_official_layout_state_dict_loads(tmp_path):
    """A plain state dict as the official release has it (DataParallel ``module.`` prefixes)."""
    from engine.models.cascadepsp import RefinementModule, RefinerConfig

    torch.manual_seed(1)
    official = RefinementModule(RefinerConfig(backbone="resnet50")).state_dict()
    path = tmp_path / "model"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    refiner = Refiner.from_official_checkpoint(path, device="cpu", save_to=tmp_path / "converted")
    loaded = refiner.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official.items())
    assert refiner.card.architecture == "cascadepsp" and refiner.card.config["backbone"] == "resnet50"
    again = Refiner.from_pretrained(tmp_path / "converted", device="cpu")  # now safetensors + card
    assert torch.equal(again.model.state_dict()["feats.conv1.weight"], official["feats.conv1.weight"])
    del official["feats.conv1.weight"]
    torch.save(official, path)
    assert_refused(lambda p: Refiner.from_official_checkpoint(p, device="cpu"), path, "missing.*feats.conv1.weight")
