"""Models the user installed: official weights downloaded on request, or files added by hand.

They live in ``<user data dir>/finemask/models/<name>/`` (platformdirs; ``$XDG_DATA_HOME`` moves
it on Linux). Each folder is one of:

- a FineMask model folder (``model.safetensors`` + ``card.json``): refinement or segmentation,
  found by name like the shipped ones (``engine.checkpoints.resolve``);
- encoder weights (``weights.pth`` + ``encoder.json``): a torchvision ResNet-18/34/50 state
  dict, the verified file unchanged (read it with ``torch.load(weights_only=True)``; see
  ``training.pretrained``), whose encoder tensors were checked against
  ``engine.models.encoders.ResNetEncoder`` on install.

Downloads are checksum-verified and nothing half-done is ever left in the folder: the file goes
to a hidden temporary folder inside it, is checked, converted, and only then renamed into place.

``FINEMASK_MODELS_URL_OVERRIDE`` (tests only) replaces the folder part of every download URL,
so tests serve generated files from a local HTTP server.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import CARD_FILE, WEIGHTS_FILE
from .errors import Cancelled, FineMaskError

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

ENCODER_WEIGHTS = "weights.pth"
ENCODER_INFO = "encoder.json"
#: Test-only: replaces the folder part of every registry URL (e.g. ``http://127.0.0.1:8000``).
URL_OVERRIDE_ENV = "FINEMASK_MODELS_URL_OVERRIDE"
#: Seconds to wait for a server to accept the connection: offline machines fail at once.
CONNECT_TIMEOUT = 5.0
#: Seconds without a byte before a started download is given up.
READ_TIMEOUT = 60.0
SHIPPED_REFINER = "refine-light"
OFFICIAL_REFINER = "cascadepsp"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class RemoteModel:
    """A file FineMask can download and install under ``name``.

    ``kind``: "refinement" or "encoder". ``architecture``: "cascadepsp" or "resnet18/34/50".
    ``md5``: the full MD5 hex digest, or None. ``sha256``: the full SHA-256 hex digest, or the
    prefix a publisher puts in the file name (torchvision: 8 hex digits), or None when unknown.
    At least one of the two is always given.
    """

    name: str
    kind: str
    architecture: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    description: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def download_url(self) -> str:
        """The URL to fetch (``$FINEMASK_MODELS_URL_OVERRIDE`` replaces its folder; tests only)."""
        base = os.environ.get(URL_OVERRIDE_ENV)
        return f"{base.rstrip('/')}/{self.filename}" if base else self.url


# Where each entry comes from:
# - cascadepsp: the file the reference's own pip package (segmentation-refinement, in
#   hkchengrex/CascadePSP, segmentation_refinement/download.py) downloads, and the MD5 it checks.
#   No SHA-256 is published and this project's machines cannot download the file, so the SHA-256
#   is trust-on-first-use: computed on install and recorded in the installed model's card
#   (training.sha256). Once a SHA-256 is known, put it in `sha256` below and it is checked.
# - resnet*-imagenet: torchvision's ImageNet1K_V1 weights (torchvision/models/resnet.py,
#   ResNet{18,34,50}_Weights.IMAGENET1K_V1). The hex in the file name is the start of the file's
#   SHA-256 (torch.hub's check_hash convention); it is checked.
REGISTRY: dict[str, RemoteModel] = {
    m.name: m
    for m in (
        RemoteModel("cascadepsp", "refinement", "cascadepsp",
                    "https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model",
                    md5="7478d4a9c42ab52beb6d7e9683402fe0",
                    description="official CascadePSP refiner (ResNet-50), the paper's weights"),
        RemoteModel("resnet18-imagenet", "encoder", "resnet18",
                    "https://download.pytorch.org/models/resnet18-f37072fd.pth", sha256="f37072fd",
                    description="torchvision ResNet-18 ImageNet1K_V1 encoder weights"),
        RemoteModel("resnet34-imagenet", "encoder", "resnet34",
                    "https://download.pytorch.org/models/resnet34-b627a593.pth", sha256="b627a593",
                    description="torchvision ResNet-34 ImageNet1K_V1 encoder weights"),
        RemoteModel("resnet50-imagenet", "encoder", "resnet50",
                    "https://download.pytorch.org/models/resnet50-0676ba61.pth", sha256="0676ba61",
                    description="torchvision ResNet-50 ImageNet1K_V1 encoder weights"),
    )
}


@dataclass
class InstalledModel:
    """An installed model: ``kind`` is "refinement", "segmentation" or "encoder"."""

    name: str
    kind: str
    folder: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""


# ------------------------------------------------------------------------------ folders


def models_dir() -> Path:
    """``<user data dir>/finemask/models`` (not created here)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("finemask", appauthor=False)) / "models"


def shipped_models() -> list[str]:
    """Names of the models shipped in ``assets/models``."""
    from .checkpoints import shipped_models as shipped

    return shipped()


def installed_folder(name: str) -> Path | None:
    """The installed FineMask model folder called ``name`` (card + weights), or None."""
    if not _NAME.match(name):
        return None
    folder = models_dir() / name
    return folder if (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file() else None


def list_installed() -> list[InstalledModel]:
    """Installed models, by name; unreadable or half-written folders are left out."""
    from .checkpoints import read_card

    root = models_dir()
    found: list[InstalledModel] = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not _NAME.match(folder.name):
            continue
        if (folder / ENCODER_INFO).is_file() and (folder / ENCODER_WEIGHTS).is_file():
            info = _read_json(folder / ENCODER_INFO)
            if info is not None:
                found.append(InstalledModel(folder.name, "encoder", folder, {}, str(info.get("source", ""))))
            continue
        if installed_folder(folder.name) is None:
            continue
        try:
            card = read_card(folder)
        except FineMaskError:
            continue
        found.append(InstalledModel(folder.name, card.task, folder, dict(card.metrics),
                                    str(card.training.get("source", ""))))
    return found


def weights_path(name: str) -> Path:
    """The installed encoder weights file ``name``: a torchvision state dict (``torch.load``-able)."""
    folder = models_dir() / name if _NAME.match(name) else None
    if folder is not None and (folder / ENCODER_WEIGHTS).is_file() and (folder / ENCODER_INFO).is_file():
        return folder / ENCODER_WEIGHTS
    how = f"finemask models get {name}" if name in REGISTRY and REGISTRY[name].kind == "encoder" \
        else f"finemask models add FILE --name {name}"
    raise FineMaskError(f"encoder weights {name!r} are not installed; run `{how}`")


def default_refiner() -> str:
    """``"cascadepsp"`` (the official weights) once installed, else the shipped ``"refine-light"``."""
    return OFFICIAL_REFINER if installed_folder(OFFICIAL_REFINER) is not None else SHIPPED_REFINER


# ------------------------------------------------------------------------------ download


def get(name: str, *, on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Path:
    """Download, verify, convert and install registry model ``name``; return its folder.

    Already installed: returns the folder at once. The file is downloaded by ``pooch`` into a
    hidden temporary folder inside :func:`models_dir` and checked (MD5 / SHA-256); a failed,
    cancelled (``Cancelled``), corrupt or unconvertible download leaves nothing behind.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise FineMaskError(f"no downloadable model {name!r} (known: {', '.join(REGISTRY)})")
    target = models_dir() / name
    if _is_installed(target):
        return target
    with _work_dir() as work:
        url = entry.download_url()
        file = _download(entry, url, work, on_progress, cancel)
        hashes = _verify(file, entry, url)
        if cancel is not None and cancel():
            raise Cancelled()
        if on_progress:
            on_progress(0, 1, f"converting {name}")
        _install_file(file, name, entry.kind, work, source=entry.description, url=entry.url, hashes=hashes,
                      architecture=entry.architecture)
        if on_progress:
            on_progress(1, 1, f"installed {name}")
    return target


def _download(entry: RemoteModel, url: str, work: Path, on_progress: ProgressFn | None,
              cancel: CancelFn | None) -> Path:
    """Fetch ``url`` into ``work`` with pooch; FineMaskError saying how to add the file by hand."""
    # pooch (fatiando/pooch) is the download library of our field (scikit-image and napari use it):
    # it streams into a temporary file and moves it to its name only once the hash matched. It
    # checks one full hash; a hash prefix (torchvision's) is checked by _verify afterwards.
    import pooch
    import requests

    known = f"md5:{entry.md5}" if entry.md5 else (f"sha256:{entry.sha256}" if _is_full_sha256(entry.sha256)
                                                  else None)
    bar = _ProgressBar(entry.name, on_progress, cancel)
    downloader = pooch.HTTPDownloader(progressbar=bar, chunk_size=1 << 20,
                                      timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    by_hand = _by_hand(entry)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # pooch logs every download at INFO; the caller shows progress
    try:
        return Path(pooch.retrieve(url, known_hash=known, fname=entry.filename, path=work / "download",
                                   downloader=downloader))
    except requests.exceptions.HTTPError as exc:
        raise FineMaskError(f"the server answered {exc.response.status_code} for {url}. {by_hand}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise FineMaskError(f"cannot download {entry.name}: {url} is unreachable or stopped answering "
                            f"(offline? {type(exc).__name__}). {by_hand}") from None
    except requests.exceptions.RequestException as exc:
        raise FineMaskError(f"the download of {url} broke off ({type(exc).__name__}: {exc}). {by_hand}") from None
    except ValueError as exc:  # pooch: the hash does not match
        raise FineMaskError(f"the file downloaded from {url} failed its checksum ({exc}): a broken transfer "
                            f"or a changed file. {by_hand}") from None
    finally:
        logger.setLevel(level)


class _ProgressBar:
    """What pooch drives as a progress bar: reports bytes to ``on_progress``, checks ``cancel``."""

    def __init__(self, name: str, on_progress: ProgressFn | None, cancel: CancelFn | None):
        self.name, self.on_progress, self.cancel = name, on_progress, cancel
        self.total = 0
        self.done = 0

    def update(self, n: int) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        self.done += n
        if self.on_progress:
            total = max(self.total, 0)
            self.on_progress(min(self.done, total) if total else self.done, total, f"downloading {self.name}")

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        pass


def _verify(path: Path, entry: RemoteModel, url: str) -> dict[str, str]:
    """Check ``path`` against the entry's MD5 / SHA-256 (or prefix); return both digests."""
    hashes = file_hashes(path)
    for algo, want in (("md5", entry.md5), ("sha256", entry.sha256)):
        if want and not hashes[algo].startswith(want.lower()):
            raise FineMaskError(f"the file downloaded from {url} has {algo.upper()} {hashes[algo]}, expected "
                                f"{want}: a broken transfer or a changed file. {_by_hand(entry)}")
    return hashes


def _by_hand(entry: RemoteModel) -> str:
    return (f"Download {entry.url} with a browser (or on a machine with internet) and install it with "
            "`finemask models add FILE`; nothing was installed")


def file_hashes(path: str | Path) -> dict[str, str]:
    """MD5 and SHA-256 hex digests of a file, read once."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


# ------------------------------------------------------------------------------ add, remove


def add(path: str | Path, name: str | None = None) -> Path:
    """Install a local file or folder; return the installed folder.

    Accepted: the official CascadePSP weights (the release's ``model`` file, or any ``.pth`` of
    that layout; converted to a FineMask model folder), a torchvision ResNet-18/34/50 state dict
    (kept as encoder weights), or a FineMask model folder (copied). A name of the download
    registry is given only to the file the registry names (its checksums must match).
    """
    src = Path(path).expanduser()
    if src.is_dir():
        return _add_folder(src, name)
    if not src.is_file():
        raise FineMaskError("no such file or folder", src)
    raw = _load_state_dict(src)
    kind, arch = _detect(raw, src)
    if name is None:
        name = OFFICIAL_REFINER if kind == "refinement" else f"{arch}-imagenet"
    entry = REGISTRY.get(name)
    hashes = file_hashes(src)
    if entry is not None:
        if entry.architecture != arch:
            raise FineMaskError(f"{name!r} is the name of the {entry.description}; this file is a {arch} "
                                f"model: choose another name with --name", src)
        for algo, want in (("md5", entry.md5), ("sha256", entry.sha256)):
            if want and not hashes[algo].startswith(want.lower()):
                raise FineMaskError(f"not the file {entry.url} ({algo.upper()} {hashes[algo]}, expected {want}); "
                                    f"install it under another name with --name", src)
    if kind != "encoder":
        del raw  # the converter reads the file itself
        raw = None
    _check_new_name(name)
    with _work_dir() as work:
        source = entry.description if entry is not None else f"added by hand from {src.name}"
        _install_file(src, name, kind, work, source=source, url=entry.url if entry else None, hashes=hashes,
                      state=raw)
    return models_dir() / name


def _add_folder(src: Path, name: str | None) -> Path:
    from .checkpoints import read_card, resolve

    card = read_card(resolve(src))
    if name is None:
        name = card.name if _NAME.match(card.name or "") else src.resolve().name
    if name in REGISTRY:
        raise FineMaskError(f"{name!r} is reserved for the {REGISTRY[name].description}; choose another name "
                            "with --name", src)
    _check_new_name(name)
    with _work_dir() as work:
        staging = work / "staging"
        staging.mkdir()
        for file in (CARD_FILE, WEIGHTS_FILE):  # only what a model folder is: no stray files
            shutil.copy2(src / file, staging / file)
        _move_into_place(staging, name)
    return models_dir() / name


def remove(name: str) -> None:
    """Remove installed model ``name`` (shipped models cannot be removed)."""
    if name in shipped_models():
        raise FineMaskError(f"{name!r} is shipped with FineMask and cannot be removed "
                            f"(installed models: {', '.join(m.name for m in list_installed()) or 'none'})")
    folder = models_dir() / name
    if not _NAME.match(name) or not folder.is_dir():
        raise FineMaskError(f"no installed model {name!r} (installed: "
                            f"{', '.join(m.name for m in list_installed()) or 'none'})")
    # Rename first, so the name disappears at once and a crash mid-delete leaves only a hidden folder.
    trash = folder.with_name(f".removing-{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ helpers


def _install_file(file: Path, name: str, kind: str, work: Path, *, source: str, url: str | None,
                  hashes: Mapping[str, str], state: Mapping[str, Any] | None = None,
                  architecture: str | None = None) -> None:
    """Convert ``file`` and rename the result into ``models_dir()/name`` (one atomic step).

    ``architecture``: what the file must be (a registry entry's), else whatever it is.
    """
    provenance = {"source": source, "file": file.name, "md5": hashes["md5"], "sha256": hashes["sha256"]}
    if url:
        provenance["url"] = url
    if kind == "refinement":
        from .checkpoints import save_checkpoint
        from .refine import Refiner

        try:
            refiner = Refiner.from_official_checkpoint(file, name=name, device="cpu", precision="float32")
        except FineMaskError as exc:
            raise FineMaskError(f"not a usable official CascadePSP checkpoint ({exc.problem}); nothing was "
                                "installed", url or file) from None
        # The SHA-256 is recorded on first install (trust on first use when none is published).
        refiner.card.training = {**refiner.card.training, **provenance}
        staging = work / "staging"
        save_checkpoint(staging, refiner.model.state_dict(), refiner.card)
    else:
        staging = work / "staging"
        try:
            raw = state if state is not None else _load_state_dict(file)
            _write_encoder(raw, file, staging, name, provenance, architecture)
        except FineMaskError as exc:
            raise FineMaskError(f"not usable ResNet encoder weights ({exc.problem}); nothing was installed",
                                url or file) from None
    _move_into_place(staging, name)


def _write_encoder(raw: Mapping[str, Any], file: Path, staging: Path, name: str,
                   provenance: Mapping[str, str], architecture: str | None = None) -> None:
    """Check a torchvision ResNet state dict against our encoder, then keep the file unchanged."""
    kind, arch = _detect(raw, file)
    if kind != "encoder" or (architecture is not None and arch != architecture):
        raise FineMaskError(f"a {arch} state dict, not {architecture or 'a ResNet'}", file)
    _encoder_state(raw, int(arch[len("resnet"):]), file)
    staging.mkdir()
    shutil.copyfile(file, staging / ENCODER_WEIGHTS)
    info = {"name": name, "kind": "encoder", "architecture": arch,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance}
    (staging / ENCODER_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")


def _move_into_place(staging: Path, name: str) -> None:
    """Rename a finished folder to its name (same file system: all or nothing)."""
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    target = models_dir() / name
    if target.exists():
        raise FineMaskError(f"a model called {name!r} was installed meanwhile; nothing was changed", target)
    os.rename(staging, target)


@contextlib.contextmanager
def _work_dir():
    """A hidden temporary folder inside the models folder, removed whatever happens."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_new_name(name: str) -> None:
    if not _NAME.match(name):
        raise FineMaskError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (64 at most), "
                            "starting with a letter or digit")
    if name in shipped_models():
        raise FineMaskError(f"{name!r} is the name of a shipped model; choose another name with --name")
    if (models_dir() / name).exists():
        raise FineMaskError(f"a model called {name!r} is already installed; remove it first "
                            f"(`finemask models remove {name}`)")


def _is_installed(folder: Path) -> bool:
    return ((folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()) or \
        ((folder / ENCODER_INFO).is_file() and (folder / ENCODER_WEIGHTS).is_file())


def _is_full_sha256(value: str | None) -> bool:
    return bool(value) and len(value) == 64


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _load_state_dict(path: Path) -> dict[str, Any]:
    """A state dict of tensors from a pickled weights file, read with ``weights_only=True``."""
    import torch

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise FineMaskError(f"not a loadable PyTorch weights file ({type(exc).__name__}: {exc})", path) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FineMaskError("file does not hold a state dict of tensors", path)
    return {str(k).removeprefix("module."): v for k, v in raw.items()}


def _detect(state: Mapping[str, Any], path: Path) -> tuple[str, str]:
    """("refinement", "cascadepsp") or ("encoder", "resnet18/34/50") from the parameter names."""
    keys = set(state)
    if any(k.startswith("feats.") for k in keys) and any(k.startswith("psp.") for k in keys):
        return "refinement", "cascadepsp"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        blocks = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
        bottleneck = "layer1.0.conv3.weight" in keys
        depth = {(False, 2): 18, (False, 6): 34, (True, 6): 50}.get((bottleneck, len(blocks)))
        if depth is None:
            raise FineMaskError(f"a ResNet state dict, but not ResNet-18, -34 or -50 ({len(blocks)} blocks in "
                                "layer3); FineMask's encoders are those three", path)
        return "encoder", f"resnet{depth}"
    raise FineMaskError("neither the official CascadePSP weights, a torchvision ResNet-18/34/50 state dict, "
                        "nor a FineMask model folder", path)


def _encoder_state(state: Mapping[str, Any], depth: int, path: Path) -> dict[str, Any]:
    """The encoder's tensors of a torchvision ResNet state dict (``fc`` dropped), shapes checked."""
    import torch

    from .models.encoders import ResNetEncoder

    with torch.device("meta"):
        expected = ResNetEncoder(depth).state_dict()
    out: dict[str, Any] = {}
    for key, ref in expected.items():
        value = state.get(key)
        if value is None and key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)  # older files leave the counters out
        if value is None:
            raise FineMaskError(f"ResNet-{depth} state dict lacks {key}", path)
        if tuple(value.shape) != tuple(ref.shape):
            raise FineMaskError(f"{key} has shape {tuple(value.shape)}, ResNet-{depth} needs {tuple(ref.shape)}",
                                path)
        out[key] = value.to(ref.dtype) if value.is_floating_point() else value
    extra = sorted(k for k in state if k not in expected and not k.startswith("fc."))
    if extra:
        raise FineMaskError(f"not a plain ResNet-{depth} state dict (unexpected {', '.join(extra[:5])})", path)
    return out
