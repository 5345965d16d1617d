"""The web app's work, free of any UI library: open, segment, refine, correct, save, fine-tune.

:class:`Workbench` is created once per server. It holds the settings, the annotation store, the
models (loaded once, cached) and a folder for files offered for download. Each browser session
(or API call) has its own :class:`Work`: the image and its current labels. All model work goes
through ``engine`` and ``training.finetune``; the Gradio layer (``server.py``) only converts
values and shows messages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.checkpoints import ModelCard, available_models, read_card, resolve
from engine.errors import FineMaskError
from engine.io import IMAGE_SUFFIXES, image_shape, read_image, read_labels, write_labels
from engine.refine_modes import mode_options
from engine.store import PairRecord, Store, check_class_ids

from .editor import EditResult, apply_strokes, brush_colours, strokes_from_layers
from .render import class_shares, fit_size

if TYPE_CHECKING:
    from training.finetune import FinetuneConfig, FinetuneResult

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SAMPLES_DIR = ASSETS / "samples"
#: Pixel limit of the web app unless ``FINEMASK_MAX_PIXELS`` or ``--max-pixels`` says otherwise:
#: 8192 x 8192; segmenting and refining one such image needs a few GB of memory.
WEB_MAX_PIXELS = 8192 * 8192
#: Smallest image side accepted: below it there is nothing to segment.
MIN_SIDE = 8
WORKING_SIZE_RANGE = (32, 4096)
#: Class probabilities are kept between Segment and Refine only up to this size; bigger images
#: refine without them (each class then competes against a fixed 0.5, as in CascadePSP).
KEEP_PROBS_BYTES = 256 << 20
#: Loaded models kept in memory (least recently used ones are dropped).
MODEL_CACHE = 3


def default_store_dir() -> Path:
    """``<user data dir>/finemask/store`` (platformdirs), the default annotation store."""
    import platformdirs

    return Path(platformdirs.user_data_dir("finemask", appauthor=False)) / "store"


def bundled_examples() -> list[Path]:
    """Sample images shipped in ``assets/samples``, smallest file first."""
    if not SAMPLES_DIR.is_dir():
        return []
    found = [p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_size, p.name))


def _default_finetune() -> FinetuneConfig:
    from training.finetune import FinetuneConfig

    return FinetuneConfig()


@dataclass
class WebConfig:
    """Settings of one web server (``python -m app.web --help`` sets most of them).

    ``model``/``refiner``: default segmentation and refinement model (shipped name or folder).
    ``max_pixels``: largest image accepted (None: ``$FINEMASK_MAX_PIXELS``, else ``WEB_MAX_PIXELS``).
    ``max_file_size``: largest upload ("500mb", or bytes). ``concurrency``: model jobs (segment,
    refine, edit, save, fine-tune) running at once over all users; the rest wait in a queue of at
    most ``queue_size``. ``editor_max_side``: longest side of the image in the browser editor;
    larger images are edited on a preview. ``display_max_side``: longest side of shown images.
    ``finetune``: defaults of fine-tuning runs (the page sets the steps and the time budget).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    store: Path = field(default_factory=default_store_dir)
    model: str | Path = "camvid"
    refiner: str | Path = "refine-light"
    max_pixels: int | None = None
    max_file_size: str | int = "500mb"
    concurrency: int = 1
    queue_size: int = 20
    editor_max_side: int = 1280
    display_max_side: int = 2048
    device: str | None = None
    finetune: FinetuneConfig = field(default_factory=_default_finetune)
    examples: list[Path] = field(default_factory=bundled_examples)

    def pixel_limit(self) -> int:
        if self.max_pixels is not None:
            return int(self.max_pixels)
        env = os.environ.get("FINEMASK_MAX_PIXELS")
        return int(env) if env else WEB_MAX_PIXELS


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelEntry:
    """A model the page offers. ``key``: what the dropdown and the API call it; ``source``:
    "shipped", "fine-tuned" (in the store's models folder) or "given" (a folder on the command line)."""

    key: str
    path: Path
    card: ModelCard
    source: str

    @property
    def label(self) -> str:
        after = (self.card.metrics or {}).get("after") or {}
        score = f", val. mIoU {after['miou']:.1f}" if self.card.task == "segmentation" and after.get("pairs") else ""
        return f"{self.key} ({self.source}{score})"


class ModelRegistry:
    """Finds the models on offer (shipped, given, fine-tuned in the store) and loads them once."""

    def __init__(self, store_root: Path, given: list[str | Path], device: str | None = None):
        self.store_root = store_root
        self.given = [g for g in given if g is not None]
        self.device = device
        self._cache: OrderedDict[tuple[str, str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def entries(self, task: str | None = None) -> list[ModelEntry]:
        """Models on offer, for ``task`` ("segmentation", "refinement") or all; re-scanned each call."""
        from training.finetune import list_versions

        found: dict[str, ModelEntry] = {}

        def offer(key: str, path: Path, card: ModelCard, source: str) -> None:
            if task is not None and card.task != task:
                return
            base, n = key, 2
            while key in found and found[key].path != path:
                key, n = f"{base}-{n}", n + 1
            found.setdefault(key, ModelEntry(key, path, card, source))

        for name in self.given:
            if isinstance(name, Path) or Path(str(name)).is_dir():
                path = resolve(name).resolve()
                offer(read_card(path).name or path.name, path, read_card(path), "given")
        for name in available_models():
            try:
                path = resolve(name).resolve()
                offer(name, path, read_card(path), "shipped")
            except FineMaskError:
                continue
        for name, path, card in list_versions(self.store_root):
            offer(name, path.resolve(), card, "fine-tuned")
        return list(found.values())

    def entry(self, key: str | None, task: str | None = None) -> ModelEntry:
        entries = self.entries(task)
        for e in entries:
            if e.key == key:
                return e
        kind = f"{task} " if task else ""
        names = ", ".join(e.key for e in entries) or "none"
        raise FineMaskError(f"unknown {kind}model {key!r} (available: {names})")

    def load(self, entry: ModelEntry) -> Any:
        """The loaded model (Segmenter or Refiner), from the cache when already loaded."""
        weights = entry.path / "model.safetensors"
        cache_key = (entry.card.task, str(entry.path), weights.stat().st_mtime)
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
            if entry.card.task == "segmentation":
                from engine.segment import Segmenter

                model = Segmenter.from_pretrained(entry.path, device=self.device)
            elif entry.card.task == "refinement":
                from engine.refine import Refiner

                model = Refiner.from_pretrained(entry.path, device=self.device)
            else:
                raise FineMaskError(f"the web app cannot use a {entry.card.task!r} model", entry.path)
            self._cache[cache_key] = model
            while len(self._cache) > MODEL_CACHE:
                self._cache.popitem(last=False)
            return model


# --------------------------------------------------------------------------------------------
# One user's work


@dataclass
class Work:
    """One image and what was done to it.

    ``image``: (H, W, 3) uint8 for 8-bit files, uint16 for 16-bit ones, float32 otherwise (the
    engine reads crops of it; keeping the file's bit depth saves memory). ``labels``: the current
    class map (H, W), what Save stores. ``before``: labels before the last refinement (for the
    before/after view). ``probs``: class probabilities (C, H, W) float16 while ``labels`` are the
    untouched segmentation of a small enough image, else None. ``uncertainty``: (H, W) float16
    in [0, 1]. ``origin``: store origin of ``labels`` ("predicted", "refined", "corrected").
    """

    name: str
    image: np.ndarray
    path: Path | None
    outdir: Path
    notes: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None
    before: np.ndarray | None = None
    probs: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    model_key: str | None = None
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    working_size: tuple[int, int] | None = None
    origin: str | None = None
    pair_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def summary(self) -> dict[str, Any]:
        """What the API returns about the current state (JSON-ready)."""
        info: dict[str, Any] = {
            "image": self.name, "height": self.shape[0], "width": self.shape[1], "notes": list(self.notes),
            "model": self.model_key, "origin": self.origin, "pair_id": self.pair_id,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.working_size is not None:
            info["working_size"] = list(self.working_size)
        if self.labels is not None:
            shares = class_shares(self.labels, len(self.classes))
            info["classes"] = {self._class_name(i): round(100 * float(s), 2) for i, s in enumerate(shares) if s > 0}
        return info

    def _class_name(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else f"class {i}"


# --------------------------------------------------------------------------------------------


class Workbench:
    """Server-wide state and the operations behind every button and API endpoint.

    ``model``, ``refiner``, ``store`` override the config's (tests pass tiny models). The default
    segmentation model is loaded at once (an error if it cannot be); a missing refiner is
    reported in ``refiner_problem`` and Refine then explains it.
    """

    def __init__(self, config: WebConfig | None = None, *, model: str | Path | None = None,
                 refiner: str | Path | None = None, store: str | Path | Store | None = None):
        self.config = config = dataclasses.replace(config or WebConfig())
        if model is not None:
            config.model = model
        if refiner is not None:
            config.refiner = refiner
        if store is not None:
            config.store = store.root if isinstance(store, Store) else Path(store)
        self.store = store if isinstance(store, Store) else Store.open(Path(config.store).expanduser())
        self.registry = ModelRegistry(self.store.root, [config.model, config.refiner], config.device)
        self.default_model = self._key_of(config.model, "segmentation")
        self.registry.load(self.registry.entry(self.default_model, "segmentation"))
        self.default_refiner: str | None = None
        self.refiner_problem: str | None = None
        try:
            self.default_refiner = self._key_of(config.refiner, "refinement")
            self.registry.load(self.registry.entry(self.default_refiner, "refinement"))
        except FineMaskError as exc:
            self.default_refiner = None
            self.refiner_problem = (f"no refinement model available: {exc}. Segmentation, correction and "
                                    "saving work without it.")
        self.outdir = Path(tempfile.mkdtemp(prefix="finemask-web-"))  # files offered for download

    def _key_of(self, name_or_path: str | Path, task: str) -> str:
        """The registry key of a configured model (a shipped name or a folder)."""
        path = resolve(name_or_path).resolve()
        card = read_card(path)
        if card.task != task:
            raise FineMaskError(f"this is a {card.task} model, not a {task} model", path)
        for e in self.registry.entries(task):
            if e.path == path:
                return e.key
        raise FineMaskError(f"model not found among the {task} models", path)  # pragma: no cover

    def close(self) -> None:
        shutil.rmtree(self.outdir, ignore_errors=True)

    # ---------------------------------------------------------------- choices for the page

    def model_choices(self, task: str = "segmentation") -> list[tuple[str, str]]:
        """(label, key) pairs for a dropdown."""
        return [(e.label, e.key) for e in self.registry.entries(task)]

    def model_working_size(self, key: str | None) -> int:
        """The working size (longer side, px) a segmentation model was trained for."""
        try:
            card = self.registry.entry(key or self.default_model, "segmentation").card
        except FineMaskError:
            return 480
        return int(max(card.input_size or [480, 360]))

    def store_summary(self) -> str:
        train, val = len(self.store.pairs("train")), len(self.store.pairs("validation"))
        return f"Annotation store: {train} training and {val} validation pairs in `{self.store.root}`"

    # ---------------------------------------------------------------- operations

    def open_image(self, path: str | Path, name: str | None = None) -> Work:
        """Check and read an uploaded image file; problems are FineMaskErrors naming the file."""
        path = Path(path)
        shown = Path(name or path.name)
        try:
            H, W = image_shape(path, max_pixels=self.config.pixel_limit())
            if min(H, W) < MIN_SIDE:
                raise FineMaskError(f"image is only {W}x{H} pixels; FineMask needs at least {MIN_SIDE}x{MIN_SIDE}")
            bits, notes = inspect_header(path)
            image = read_image(path, max_pixels=self.config.pixel_limit())
        except FineMaskError as exc:
            # Name the file as the user knows it, not by the server's upload path.
            raise FineMaskError(exc.problem, shown) from None
        except Exception as exc:  # a header the engine accepted but Pillow/tifffile choke on
            raise FineMaskError(f"cannot read the image: corrupt or unsupported file ({exc})", shown) from None
        if bits == 8:
            image = (image * 255.0 + 0.5).astype(np.uint8)
        elif bits == 16:
            image = (image * 65535.0 + 0.5).astype(np.uint16)
        outdir = self.outdir / uuid.uuid4().hex[:12]
        outdir.mkdir(parents=True, exist_ok=True)
        return Work(name=shown.stem or "image", image=image, path=path, outdir=outdir, notes=notes)

    def segment(self, work: Work, model: str | None = None, working_size: int | None = None,
                on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Work:
        """Segment ``work.image`` with a segmentation model; replaces the labels."""
        entry = self.registry.entry(model or self.default_model, "segmentation")
        size = int(working_size or self.model_working_size(entry.key))
        lo, hi = WORKING_SIZE_RANGE
        if not lo <= size <= hi:
            raise FineMaskError(f"working size must lie in {lo}..{hi} pixels, got {size}")
        segmenter = self.registry.load(entry)
        t0 = time.perf_counter()
        if on_progress:
            on_progress(0, 1, f"segmenting with {entry.key}")
        result = segmenter.predict_batch([work.image], size, on_progress=on_progress, cancel=cancel)[0]
        work.seconds = {"segment": time.perf_counter() - t0}
        work.labels = result.labels
        work.before = None
        work.probs = result.probs if result.probs.nbytes <= KEEP_PROBS_BYTES else None
        work.uncertainty = result.uncertainty.astype(np.float16)
        work.model_key = entry.key
        work.classes, work.palette = segmenter.classes, segmenter.palette
        work.working_size = result.working_size
        work.origin = "predicted"
        return work

    def refiner_for(self, key: str | None):
        """The Refiner for ``key`` (None: the default); a clear error when none is installed."""
        if not key:
            if self.default_refiner is None:
                raise FineMaskError(self.refiner_problem or "no refinement model available")
            key = self.default_refiner
        return self.registry.load(self.registry.entry(key, "refinement"))

    def refine(self, work: Work, refiner: str | None = None, mode: str = "fast",
               on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Work:
        """Refine the current labels at full resolution (``mode``: see ``engine.refine_modes``)."""
        if work.labels is None:
            raise FineMaskError("nothing to refine yet: segment the image (or load labels) first")
        options = mode_options(mode)
        model = self.refiner_for(refiner)
        t0 = time.perf_counter()
        labels, confidence = model.refine_labels(work.image, work.labels, work.probs, **options,
                                                 on_progress=on_progress, cancel=cancel, return_confidence=True)
        work.seconds["refine"] = time.perf_counter() - t0
        work.before = work.labels
        work.labels = labels
        work.probs = None
        work.uncertainty = (1.0 - confidence).astype(np.float16)
        work.origin = "corrected" if work.origin == "corrected" else "refined"
        return work

    def set_labels(self, work: Work, labels_path: str | Path, model: str | None = None) -> Work:
        """Use a label file (TIFF or palette PNG of the image's size) as the current labels.

        Class names and colours come from ``model`` (default: the default segmentation model).
        """
        entry = self.registry.entry(model or self.default_model, "segmentation")
        labels = read_labels(labels_path, shape=work.shape, max_pixels=self.config.pixel_limit())
        work.labels, work.before, work.probs, work.uncertainty = labels, None, None, None
        work.model_key = entry.key
        work.classes, work.palette = list(entry.card.classes), [list(c) for c in entry.card.palette]
        work.origin = "corrected"
        return work

    def editor_shape(self, work: Work) -> tuple[int, int]:
        """(h, w) of the image in the browser editor (a preview when the image is large)."""
        return fit_size(*work.shape, self.config.editor_max_side)

    def brush_colours(self, work: Work) -> list[tuple[int, int, int]]:
        return brush_colours(work.palette, max(len(work.classes), 1))

    def apply_edit(self, work: Work, layers: list[np.ndarray], on_progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> EditResult:
        """Apply editor layers (RGBA at editor size) to the labels; re-snaps preview edits."""
        if work.labels is None:
            raise FineMaskError("nothing to correct yet: segment the image first")
        strokes = strokes_from_layers(layers, self.brush_colours(work), self.editor_shape(work))
        refiner = None
        if strokes.shape != work.shape and self.default_refiner is not None:
            refiner = self.refiner_for(None)
        result = apply_strokes(work.labels, strokes, work.image, refiner, on_progress=on_progress, cancel=cancel)
        if result.changed:
            work.before, work.labels = work.labels, result.labels
            work.probs = None
            work.origin = "corrected"
        return result

    def save(self, work: Work) -> PairRecord:
        """Add the image and its current labels to the store, or update the pair saved before."""
        if work.labels is None:
            raise FineMaskError("nothing to save yet: segment the image first")
        store = self.store
        if store.class_names is None and work.classes:
            # Check before naming the store's classes, so refused labels leave the store untouched.
            present = np.flatnonzero(np.bincount(work.labels.reshape(-1)))
            check_class_ids(present, work.classes, work.path if work.path is not None else Path(work.name))
            store.set_class_names(work.classes)
        pair_id = work.pair_id if work.pair_id in store else self._pair_of_same_image(work)
        origin = work.origin or "corrected"
        if pair_id is not None:
            record = store.update(pair_id, work.labels, origin=origin, model_version=work.model_key)
        else:
            # The uploaded file's bytes are kept as they are (its name, as uploaded, names the pair).
            source: Any = work.path if work.path is not None and work.path.is_file() else work.image
            pair_id = store.add(source, work.labels, origin, model_version=work.model_key)
            record = store.get(pair_id)
        work.pair_id = record.id
        return record

    def _pair_of_same_image(self, work: Work) -> str | None:
        if work.path is None or not work.path.is_file():
            return None
        digest = hashlib.sha256()
        with open(work.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        for rec in self.store.pairs():
            if rec.image_sha256 == sha:
                return rec.id
        return None

    def export(self, work: Work) -> list[Path]:
        """Write the current labels as TIFF (and palette PNG when ids fit in 8 bits) for download."""
        if work.labels is None:
            return []
        tif = write_labels(work.outdir / f"{work.name}_labels.tif", work.labels)
        if int(work.labels.max()) > 255:
            return [tif]
        png = write_labels(work.outdir / f"{work.name}_labels.png", work.labels, palette=work.palette)
        return [tif, png]

    def finetune(self, base: str | None, steps: int | None = None, minutes: float | None = None,
                 on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> FinetuneResult:
        """Fine-tune ``base`` (any model key) on the store (the step budget and minutes override
        the config's); a cancelled run returns ``finished=False`` and resumes when started again."""
        from training.finetune import finetune

        entry = self.registry.entry(base or self.default_model)
        cfg = dataclasses.replace(self.config.finetune)
        if steps is not None:
            if int(steps) < 1:
                raise FineMaskError(f"the step budget must be at least 1, got {steps}")
            cfg.steps = int(steps)
        if minutes:
            cfg.time_budget_s = float(minutes) * 60.0
        return finetune(self.store, entry.path, cfg, on_progress=on_progress, cancel=cancel)


def inspect_header(path: Path) -> tuple[int, list[str]]:
    """Bit depth (8, 16 or 32) of an image file and notes for the user about its layout."""
    import tifffile
    from PIL import Image

    notes: list[str] = []
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            dtype, shape = np.dtype(page.dtype), tuple(page.shape)
            channels = shape[-1] if len(shape) == 3 and shape[-1] <= 4 else (shape[0] if len(shape) == 3 else 1)
            if len(tif.pages) > 1:
                notes.append("multi-page TIFF: only the first page is used")
        bits = 8 if dtype == np.uint8 else 16 if dtype == np.uint16 else 32
        alpha = channels in (2, 4)
        gray = channels in (1, 2)
    else:
        with Image.open(path) as img:
            mode = img.mode
            alpha = mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            bits = 16 if mode.startswith("I;16") else 8
            gray = mode in ("L", "LA", "1") or mode.startswith("I;16")
    if bits == 16:
        notes.append("16-bit image: analysed at full precision; shown contrast-stretched to 8 bits")
    elif bits == 32:
        notes.append("floating-point image: values are used as they are (expected in 0..1)")
    if alpha:
        notes.append("transparency (alpha channel) is ignored: the image is analysed as RGB")
    if gray:
        notes.append("grey-scale image: analysed as RGB with three equal channels")
    return bits, notes


__all__ = [
    "MIN_SIDE",
    "WEB_MAX_PIXELS",
    "ModelEntry",
    "ModelRegistry",
    "WebConfig",
    "Work",
    "Workbench",
    "bundled_examples",
    "default_store_dir",
    "inspect_header",
]
