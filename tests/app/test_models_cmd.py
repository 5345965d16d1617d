"""``finemask models get|add|list|remove``: downloads from a local HTTP server, checksums, atomicity.

A server on 127.0.0.1 serves generated files under the registry's file names:
``model`` (a state dict in the official CascadePSP layout, ``module.`` prefix, float32) and
``resnet18-f37072fd.pth`` (a torchvision ResNet-18 state dict). The registry's hashes are
monkeypatched to those of the generated files. After every failure nothing may remain: no file
or folder, hidden or not, in the models folder, and nothing in the temporary folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from app.cli import main
from engine import installed
from engine.checkpoints import ASSETS_MODELS, available_models, resolve
from engine.errors import Cancelled, FineMaskError
from engine.models.cascadepsp import RefinementModule, RefinerConfig
from engine.models.encoders import ResNetEncoder
from engine.refine import Refiner

RESNET18_FILE = installed.REGISTRY["resnet18-imagenet"].filename
OFFICIAL_FILE = installed.REGISTRY["cascadepsp"].filename


# ------------------------------------------------------------------------------ generated files


def _official_file(folder: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A random state dict with the official CascadePSP file's names, shapes and prefix (float32).

    Returns the file's bytes and a few of its tensors to compare with.
    """
    with torch.device("meta"):  # shapes only: building ResNet-50 for real takes seconds
        shapes = {k: v.shape for k, v in RefinementModule(RefinerConfig(backbone="resnet50")).state_dict().items()}
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[f"module.{key}"] = torch.tensor(45000)
        elif key.endswith("running_var"):
            state[f"module.{key}"] = torch.rand(shape, generator=g) + 0.5
        else:
            state[f"module.{key}"] = torch.randn(shape, generator=g) * 0.02
    path = folder / OFFICIAL_FILE
    torch.save(state, path)
    samples = {k: state[f"module.{k}"] for k in ("psp.bottleneck.bias", "feats.conv1.weight", "final_21.weight")}
    return path.read_bytes(), samples


def _resnet18_bytes(folder: Path) -> bytes:
    """A torchvision-layout ResNet-18 state dict (with its ImageNet classifier ``fc``)."""
    torch.manual_seed(5)
    state = ResNetEncoder(18).state_dict()
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = folder / RESNET18_FILE
    torch.save(state, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    return _official_file(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """What the server offers (the official file only to the tests that ask for it: it is large)."""
    return {RESNET18_FILE: _resnet18_bytes(tmp_path_factory.mktemp("served"))}


# ------------------------------------------------------------------------------ the local server


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))  # the whole file's length, always
        self.end_headers()
        if name in self.server.truncate:  # half the body, then the connection closes
            body = body[: len(body) // 2]
            self.close_connection = True
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled download)
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch, server, files):
    """Models folder and temp folder under tmp_path; downloads from the local server."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv(installed.URL_OVERRIDE_ENV, f"http://127.0.0.1:{server.server_port}")
    server.files = dict(files)
    server.truncate = set()
    server.requests = []
    assert installed.models_dir() == tmp_path / "data" / "finemask" / "models"
    return tmp


def _expect(monkeypatch, name: str, data: bytes, *, md5: bool = False, prefix: bool = False) -> None:
    """Make the registry entry ``name`` expect ``data``'s MD5 or SHA-256 prefix."""
    entry = installed.REGISTRY[name]
    changes = {}
    if md5:
        changes["md5"] = hashlib.md5(data).hexdigest()
    if prefix:
        changes["sha256"] = hashlib.sha256(data).hexdigest()[:8]
    monkeypatch.setitem(installed.REGISTRY, name, dataclasses.replace(entry, **changes))


def _leftovers(tmp: Path) -> list[str]:
    root = installed.models_dir()
    found = [str(p) for p in root.rglob("*")] if root.exists() else []
    return found + [str(p) for p in tmp.rglob("*")]


# ------------------------------------------------------------------------------ downloads


@pytest.mark.slow  # a ResNet-50 refiner is built three times: about 15 s on two busy cores
def test_get_official_installs_lists_loads_and_becomes_default(env, monkeypatch, server, official, capsys):
    data, samples = official
    server.files[OFFICIAL_FILE] = data
    _expect(monkeypatch, "cascadepsp", data, md5=True)
    assert installed.default_refiner() == "refine-light"
    assert "cascadepsp" not in available_models()

    assert main(["models", "get", "cascadepsp"]) == 0
    folder = installed.models_dir() / "cascadepsp"
    assert sorted(p.name for p in installed.models_dir().iterdir()) == ["cascadepsp"]  # no temp left
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    assert sorted(_leftovers(env)) == [str(folder), str(folder / "card.json"), str(folder / "model.safetensors")]
    card = json.loads((folder / "card.json").read_text())
    # trust on first use: the SHA-256 of the file as downloaded is recorded, with the checked MD5
    assert card["training"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["training"]["md5"] == hashlib.md5(data).hexdigest()
    assert card["training"]["url"] == installed.REGISTRY["cascadepsp"].url

    assert installed.default_refiner() == "cascadepsp"
    assert "cascadepsp" in available_models() and resolve("cascadepsp") == folder
    refiner = Refiner.from_pretrained("cascadepsp", device="cpu", precision="float32")
    for key, value in samples.items():
        assert torch.equal(refiner.model.state_dict()[key], value), key
    assert [m.name for m in installed.list_installed()] == ["cascadepsp"]

    capsys.readouterr()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "cascadepsp (default refiner)" in out and "cascadepsp (installed)" in out
    assert "refine-light (default refiner)" not in out

    requests = len(server.requests)
    assert main(["models", "get", "cascadepsp"]) == 0  # already there: no second download
    assert len(server.requests) == requests and "already installed" in capsys.readouterr().out

    assert main(["models", "remove", "cascadepsp"]) == 0
    assert installed.default_refiner() == "refine-light" and "cascadepsp" not in available_models()
    assert _leftovers(env) == []


def test_get_resnet_keeps_the_verified_file(env, monkeypatch, files, capsys):
    data = files[RESNET18_FILE]
    _expect(monkeypatch, "resnet18-imagenet", data, prefix=True)
    with pytest.raises(FineMaskError, match="not installed; run `finemask models get resnet18-imagenet`"):
        installed.weights_path("resnet18-imagenet")
    assert main(["models", "get", "resnet18-imagenet"]) == 0
    path = installed.weights_path("resnet18-imagenet")
    assert path.read_bytes() == data  # kept as it was published
    state = torch.load(path, weights_only=True)
    encoder = ResNetEncoder(18)
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    assert torch.equal(encoder.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    [model] = installed.list_installed()
    assert (model.name, model.kind) == ("resnet18-imagenet", "encoder")
    assert "resnet18-imagenet" not in available_models()  # encoders are no segmentation/refinement models
    assert installed.default_refiner() == "refine-light"


def _error_line(stderr: str) -> str:
    """The one error line of a failed command (the progress bar may have drawn before it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr and [line for line in lines if "error" in line] == lines[-1:], stderr
    assert lines[-1].startswith("finemask models: error: ")
    return lines[-1]


def _refuse_port() -> int:
    """A port on 127.0.0.1 with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["wrong-md5", "wrong-sha256", "truncated", "server-down", "not-found",
                                  "not-convertible"])
def test_failed_download_leaves_nothing(case, env, monkeypatch, server, files, capsys):
    name = "cascadepsp" if case == "wrong-md5" else "resnet18-imagenet"
    entry = installed.REGISTRY[name]
    data = files[RESNET18_FILE]
    if case == "wrong-md5":  # the registry keeps the real file's MD5 (pooch checks it)
        server.files[OFFICIAL_FILE] = b"not the official CascadePSP weights" * 1000
    elif case == "wrong-sha256":
        pass  # the real file's SHA-256 prefix (f37072fd) does not match the generated file
    elif case == "truncated":
        _expect(monkeypatch, name, data, prefix=True)
        server.truncate = {entry.filename}
    elif case == "server-down":
        monkeypatch.setenv(installed.URL_OVERRIDE_ENV, f"http://127.0.0.1:{_refuse_port()}")
    elif case == "not-found":
        server.files.pop(entry.filename)
    else:  # the checksum matches, but the file is no state dict
        garbage = b"these bytes are no PyTorch file" * 100
        server.files[entry.filename] = garbage
        _expect(monkeypatch, name, garbage, prefix=True)

    assert main(["models", "get", name]) == 2
    err = _error_line(capsys.readouterr().err)
    assert _leftovers(env) == []
    assert installed.list_installed() == [] and installed.default_refiner() == "refine-light"
    expected = {
        "wrong-md5": "checksum", "wrong-sha256": "SHA256", "truncated": "broke off", "not-found": "answered 404",
        "server-down": "unreachable", "not-convertible": "not usable ResNet encoder weights",
    }[case]
    assert expected in err
    if case != "not-convertible":
        assert entry.url in err and "finemask models add FILE" in err  # how to get it by hand


def test_cancel_during_download_leaves_nothing(env, monkeypatch, files):
    _expect(monkeypatch, "resnet18-imagenet", files[RESNET18_FILE], prefix=True)
    seen = []
    with pytest.raises(Cancelled):
        installed.get("resnet18-imagenet", on_progress=lambda d, t, m: seen.append((d, t)),
                      cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2 and seen[0][1] == len(files[RESNET18_FILE])
    assert _leftovers(env) == []


# ------------------------------------------------------------------------------ add, list, remove


def test_add_list_and_remove(env, monkeypatch, files, tmp_path, capsys):
    data = files[RESNET18_FILE]
    hand = tmp_path / "by-hand" / RESNET18_FILE
    hand.parent.mkdir()
    hand.write_bytes(data)
    # under the registry's name only the registry's file is accepted
    assert main(["models", "add", str(hand)]) == 2
    assert "not the file" in capsys.readouterr().err and _leftovers(env) == []
    _expect(monkeypatch, "resnet18-imagenet", data, prefix=True)
    assert main(["models", "add", str(hand)]) == 0
    assert installed.weights_path("resnet18-imagenet").read_bytes() == data

    # a FineMask model folder is copied under a new name and found by that name
    assert main(["models", "add", str(ASSETS_MODELS / "refine-light"), "--name", "my-refiner"]) == 0
    assert resolve("my-refiner") == installed.models_dir() / "my-refiner"
    assert "my-refiner" in available_models()
    Refiner.from_pretrained("my-refiner", device="cpu")
    assert installed.default_refiner() == "refine-light"  # only the official weights take over

    capsys.readouterr()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    installed_part = out.split("installed (")[1].split("downloadable")[0]
    assert "my-refiner" in installed_part and "refinement" in installed_part
    assert "resnet18-imagenet" in installed_part and "encoder" in installed_part
    assert "IoU" in installed_part  # the copied card's metrics are shown

    # refused: a shipped name, a name taken, a file that is no model, removing a shipped model
    assert main(["models", "add", str(ASSETS_MODELS / "refine-light"), "--name", "camvid"]) == 2
    assert "shipped model" in capsys.readouterr().err
    assert main(["models", "add", str(ASSETS_MODELS / "refine-light"), "--name", "my-refiner"]) == 2
    assert "already installed" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    torch.save({"weight": torch.zeros(3)}, junk)
    assert main(["models", "add", str(junk)]) == 2
    assert "junk.pth" in capsys.readouterr().err
    assert main(["models", "remove", "refine-light"]) == 2
    assert "shipped with FineMask and cannot be removed" in capsys.readouterr().err
    assert (ASSETS_MODELS / "refine-light" / "card.json").is_file()
    assert main(["models", "remove", "nothing-here"]) == 2
    assert "no installed model 'nothing-here'" in capsys.readouterr().err

    assert main(["models", "remove", "my-refiner"]) == 0
    with pytest.raises(FineMaskError, match="no such model"):
        resolve("my-refiner")
    assert [m.name for m in installed.list_installed()] == ["resnet18-imagenet"]
    assert sorted(p.name for p in installed.models_dir().iterdir()) == ["resnet18-imagenet"]


def test_add_official_file_under_its_name_checks_the_md5(env, tmp_path, capsys):
    # the layout is recognised by its parameter names; the MD5 is checked before any conversion
    state = {"module.feats.conv1.weight": torch.zeros(64, 6, 7, 7), "module.psp.bottleneck.bias": torch.ones(1024)}
    path = tmp_path / "model"
    torch.save(state, path)
    assert main(["models", "add", str(path)]) == 2  # default name cascadepsp; the real MD5 differs
    err = capsys.readouterr().err
    assert "not the file" in err and "--name" in err
    assert _leftovers(env) == []


def test_list_shows_a_stores_fine_tuned_versions(env, tmp_path, capsys):
    store = tmp_path / "store"
    version = store / "models" / "idrid-ft-1"
    version.mkdir(parents=True)
    for f in ("card.json", "model.safetensors"):
        shutil.copy2(ASSETS_MODELS / "idrid" / f, version / f)
    assert main(["models", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    tuned = out.split("fine-tuned in")[1]
    assert "idrid-ft-1" in tuned and "segmentation" in tuned and "mIoU 36.2" in tuned
    assert main(["models", "list", "--store", str(tmp_path / "absent")]) == 2
