"""Fine-tune a model on the corrected labels of an annotation store.

``finetune(store, "camvid")`` trains a copy of the base model on the store's train pairs with the
model's own loss (DSRL: CE + 0.1 MSE + 1.0 FA with its SISR branch; refiner: the cascade loss
on 224x224 crops of the corrected masks with perturbed coarse inputs), evaluates base and new
model on the store's validation pairs (with none, on a strip of each training pair held back from
training: ``training.holdout``), and writes the new version atomically to
``<store>/models/<name>/`` (weights, card, and the run's ``log.csv`` and ``loss.png``). The
base is only read.

Under ``torchrun`` (``torchrun --nproc-per-node N -m training finetune STORE ...``) every process
trains on its share of each global batch (BatchNorm statistics over the whole batch, see
``training.sync_bn``); rank 0 evaluates, checkpoints and writes the version.

Resumable: the run's state lives in ``<store>/models/.runs/<key>/`` where the key names the
base weights, the store content and the settings; calling ``finetune`` again with the same
arguments after a crash or a cancel continues from the last checkpoint. The folder is removed
once the version is written.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.atomic import atomic_write_bytes
from engine.checkpoints import ModelCard, load_checkpoint, resolve
from engine.errors import FineMaskError
from engine.filelock import FileLock
from engine.hashing import hash_file
from engine.io import default_palette
from engine.metrics import boundary_accuracy_multiclass, confusion_matrix_open, miou
from engine.store import UNLABELLED, Store
from engine.versions import MODELS_DIR, list_versions, models_dir  # noqa: F401 - re-exported (moved to engine)
from training.augment import resize_labels
from training.data.store_dataset import StoreDataset
from training.finetune_checks import check_class_count, check_memory, require_labelled_pixels
from training.holdout import HELD_OUT, PairPart
from training.loop import EpochKeyed, LoopConfig, train_loop

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]
RUNS_DIR = ".runs"
#: Coarse masks for evaluating a refiner: ground truth downscaled by this factor and upscaled.
COARSE_FACTOR = 8


@dataclass
class FinetuneConfig:
    """Budget and optimisation of one fine-tuning run.

    ``steps``: step budget; ``time_budget_s``: seconds of training after which the run ends
    normally (whichever comes first). ``crop``: (height, width) of the training crops at the
    model's output scale (DSRL) ; refiners always use 224x224 crops. ``ignore_index``: label
    value that marks unlabelled pixels (never a class; default 255, the store's unlabelled
    value). ``name``: the version's name (default ``<base>-ft<N>``). ``input_size``: a new working
    size (width, height) for a segmenter, say to move a street-scene model to 4K fundus images;
    training then sees the data at that scale.
    """

    steps: int = 300
    time_budget_s: float | None = None
    batch_size: int = 4
    lr: float = 1e-4
    crop: tuple[int, int] = (256, 256)
    seed: int = 0
    ignore_index: int | None = UNLABELLED
    name: str | None = None
    input_size: tuple[int, int] | None = None
    ckpt_every: int = 25
    log_every: int = 5


@dataclass
class FinetuneResult:
    """Where a run ended. ``before``/``after``: scores on the store's validation pairs, or with
    none on a held-back strip of each training pair (``validation``: ``training.holdout.HELD_OUT``)
    (``miou``, ``mba``, ``pixel_accuracy`` in percent, ``pairs``, ``per_class_iou``); ``after`` is empty and
    ``model_path`` None when the run was cancelled (its state is kept for a resume)."""

    model_path: Path | None
    name: str | None
    steps: int
    finished: bool
    before: dict[str, Any]
    after: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None
    seconds: float = 0.0


def finetune(
    store: Store | str | Path,
    base: str | Path,
    config: FinetuneConfig | None = None,
    *,
    on_progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    resume: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base`` (a shipped name or a model folder) on ``store``; see the module doc.

    ``on_progress(done, total, message)`` reports evaluation and training steps (the message
    carries loss and ETA); ``cancel()`` returning True stops at the next step, keeping the
    state. With ``resume`` False an interrupted run with the same key starts over.
    """
    cfg = config or FinetuneConfig()
    if cfg.steps < 1:
        raise FineMaskError(f"the step budget must be at least 1, got {cfg.steps}")
    store = store if isinstance(store, Store) else Store.open(store, create=False)
    base_path = resolve(base)
    state, card = load_checkpoint(base_path)
    train_pairs, val_pairs = store.pairs("train"), store.pairs("validation")
    if not train_pairs:
        raise FineMaskError("the annotation store has no training pairs to learn from yet", store.root)
    require_labelled_pixels(store, train_pairs, val_pairs, cfg.ignore_index)
    job_type = {"segmentation": SegmentationJob, "refinement": RefinementJob}.get(card.task)
    if job_type is None:
        raise FineMaskError(f"cannot fine-tune a {card.task!r} model", base_path)
    held_out = not val_pairs  # no validation pairs: score on a held-back strip of each training pair
    job = job_type(state, card, PairPart(store, "train") if held_out else store, cfg)
    if held_out:
        job.store, val_pairs = PairPart(store, "held"), train_pairs  # what the jobs evaluate on
    check_memory(job, cfg.batch_size)  # before any forward pass: refuse with the figures

    started = time.perf_counter()
    report = on_progress or (lambda done, total, message: None)
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0  # under torchrun rank 0 evaluates and exports
    before = job.evaluate_base(base_path, val_pairs, _phase(report, "evaluating the base model")) if main else {}
    if held_out and main:
        before["validation"] = HELD_OUT

    if cfg.batch_size < 2:
        raise FineMaskError(f"the batch must hold at least 2 crops (BatchNorm), got {cfg.batch_size}")
    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                      schedule="poly", seed=cfg.seed, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                      time_budget_s=cfg.time_budget_s)
    key = _run_key(base_path, store.content_hash(), cfg, loop)
    run_dir = models_dir(store) / RUNS_DIR / key
    lock = FileLock(models_dir(store) / RUNS_DIR / f"{key}.lock", timeout=0)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if main:
        try:
            lock.acquire()
        except FineMaskError:
            raise FineMaskError("this fine-tuning run is already going on in another process", run_dir) from None
    try:
        if main and not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if distributed:  # the others read the run folder only once rank 0 has set it up
            dist.barrier()
        cancelled = []

        def stop() -> bool:
            if cancel is not None and cancel():
                cancelled.append(True)
                return True
            return False

        result = train_loop(job.model, job.loss_fn, job.train_data, loop, run_dir, params=job.params(cfg.lr),
                            resume=resume, on_progress=_with_eta(report, cfg),
                            cancel=stop)
        if cancelled or not main:
            return FinetuneResult(None, None, result.step, not cancelled and result.step >= cfg.steps, before,
                                  {}, result.history, run_dir, time.perf_counter() - started)
        after = job.evaluate_trained(val_pairs, _phase(report, "evaluating the new model"))
        if held_out:
            after["validation"] = HELD_OUT
        elif after.get("miou") is None:  # never write a version scored on no labels
            raise FineMaskError("the validation pairs hold no labelled pixels; no version was written", store.root)
        name = cfg.name or next_version_name(store, card.name or base_path.name)
        seconds = time.perf_counter() - started
        training = {
            "data": f"annotation store {store.root} ({len(train_pairs)} train / "
                    + (f"no validation pairs: scored on the {HELD_OUT} of each training pair, never trained on)"
                       if held_out else f"{len(val_pairs)} validation pairs)"),
            "store": str(store.root), "store_hash": store.content_hash(), "base": str(base_path),
            "steps": result.step, "seconds": round(seconds, 1), "config": asdict(cfg),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = job.export(models_dir(store) / name, name=name, parent=card.name or str(base_path),
                          metrics={"before": before, "after": after}, training=training)
        for log in ("log.csv", "loss.png"):  # the loss curve stays with the version it made
            if (run_dir / log).is_file():
                atomic_write_bytes(path / log, (run_dir / log).read_bytes())
        shutil.rmtree(run_dir, ignore_errors=True)
        return FinetuneResult(path, name, result.step, True, before, after, result.history, None, seconds)
    finally:
        if main:
            lock.release()


def next_version_name(store: Store | str | Path, base_name: str) -> str:
    """``<root>-ft<N>`` with N one more than any version of the same root in the store."""
    root = re.sub(r"(-ft\d+)+$", "", base_name) or "model"
    pattern = re.compile(rf"^{re.escape(root)}-ft(\d+)$")
    folder = models_dir(store)
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := pattern.match(p.name))]
    return f"{root}-ft{max(numbers, default=0) + 1}"


# --- the two kinds of model ---------------------------------------------------------------


class SegmentationJob:
    """Fine-tuning of a DSRL segmenter with its full training loss (SISR branch included)."""

    def __init__(self, state: dict[str, torch.Tensor], card: ModelCard, store: Store, cfg: FinetuneConfig):
        from engine.models import SegmenterConfig, create_model, strip_training_branches
        from training.data.dsrl_pairs import DSRLPairConfig, DSRLPairs
        from training.train_dsrl import make_loss

        config = SegmenterConfig.from_dict(card.config)
        ignore = cfg.ignore_index
        check_class_count(store, ignore, config.num_classes)
        ids = [c for c in store.classes() if c != ignore]
        num_classes = max(config.num_classes, max(ids, default=-1) + 1)
        if ignore is not None and ignore < num_classes:
            raise FineMaskError(f"ignore index {ignore} is one of the model's class ids (0..{num_classes - 1})")
        if num_classes > config.num_classes:
            state, config = extend_classes(state, config, num_classes)
        torch.manual_seed(cfg.seed)
        self.model = create_model(config)
        own = self.model.state_dict()
        training_only = set(own) - set(strip_training_branches(own))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - training_only:
            bad = sorted(unexpected or set(missing) - training_only)
            raise FineMaskError(f"the model's weights do not match its card ({len(bad)} tensors differ, "
                                f"e.g. {bad[0]!r})", Path(card.name))
        # a base saved for inference only lacks the SISR branch: that part starts from scratch
        self.classes, self.palette = _class_names(card, store, num_classes)
        input_size = list(cfg.input_size) if cfg.input_size else card.input_size
        self.card = ModelCard(name=card.name, task="segmentation", architecture="dsrl", config=config.to_dict(),
                              classes=self.classes, palette=self.palette, input_size=input_size)
        self.ignore = ignore
        self.working = int(max(input_size or [480, 360]))
        data = StoreDataset(store, store.pairs("train"), self.classes, self.palette, ignore, 2 * self.working,
                            min_length=cfg.batch_size)
        crop = tuple(_round_to(c, 2 * self.model.pad_multiple) for c in cfg.crop)
        self.crop = crop
        self.train_data = EpochKeyed(DSRLPairs(data, DSRLPairConfig(
            crop_size=crop, scale_range=(0.75, 1.25), pad_multiple=self.model.pad_multiple, seed=cfg.seed)))
        self.loss_fn = make_loss(config, data.ignore_index)
        self.store = store

    def params(self, lr: float) -> list:
        return self.model.param_groups(lr, weight_decay=1e-4)

    def evaluate_base(self, base_path: Path, pairs, report: ProgressFn) -> dict[str, Any]:
        from engine.segment import Segmenter

        return self._evaluate(Segmenter.from_pretrained(base_path, device="cpu"), pairs, report)

    def evaluate_trained(self, pairs, report: ProgressFn) -> dict[str, Any]:
        from training.evaluate import segmenter_from_training_model

        self.model.eval()
        return self._evaluate(segmenter_from_training_model(self.model.cpu(), self.card), pairs, report)

    def _evaluate(self, segmenter, pairs, report: ProgressFn) -> dict[str, Any]:
        preds = []
        for i, rec in enumerate(pairs):
            image, gt = self.store.load(rec.id)
            preds.append((segmenter.predict(image).labels, gt))
            report(i + 1, len(pairs), rec.id)
        return segmentation_scores(preds, self.classes, self.ignore)

    def export(self, folder: Path, *, name: str, parent: str, metrics: dict, training: dict) -> Path:
        from training.train_dsrl import export_segmenter

        return export_segmenter(self.model.cpu(), folder, name=name, classes=self.classes, palette=self.palette,
                                input_size=tuple(self.card.input_size or (480, 360)), training=training,
                                metrics=metrics, parent=parent)


class RefinementJob:
    """Fine-tuning of a CascadePSP refiner on crops of the store's corrected class masks."""

    def __init__(self, state: dict[str, torch.Tensor], card: ModelCard, store: Store, cfg: FinetuneConfig):
        from engine.models.cascadepsp import RefinerConfig, build_refinement_module
        from training.data.refine_crops import ClassMaskSource, RefineCropConfig, RefineCrops

        self.model = build_refinement_module(RefinerConfig.from_dict(card.config))
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise FineMaskError(f"refiner weights do not match its card ({str(exc).splitlines()[0]})") from None
        self.ignore = cfg.ignore_index
        check_class_count(store, self.ignore, 0)
        ids = [c for c in store.classes() if c != self.ignore]
        self.classes = [f"class {i}" for i in range(max(ids, default=0) + 1)]
        data = StoreDataset(store, store.pairs("train"), self.classes, ignore_index=self.ignore)
        crops = RefineCropConfig(seed=cfg.seed)
        self.train_data = EpochKeyed(RefineCrops([ClassMaskSource(data)], length=max(64, cfg.batch_size * 16),
                                                 config=crops))
        self.card, self.store = card, store

    def params(self, lr: float) -> list:
        return list(self.model.parameters())

    @staticmethod
    def loss_fn(net, batch):
        from training.train_refine import refine_loss_fn

        return refine_loss_fn(net, batch)

    def evaluate_base(self, base_path: Path, pairs, report: ProgressFn) -> dict[str, Any]:
        from engine.refine import Refiner

        return self._evaluate(Refiner.from_pretrained(base_path, device="cpu", precision="float32"), pairs, report)

    def evaluate_trained(self, pairs, report: ProgressFn) -> dict[str, Any]:
        from engine.refine import Refiner

        self.model.eval()
        return self._evaluate(Refiner(self.model.cpu(), device="cpu", precision="float32"), pairs, report)

    def _evaluate(self, refiner, pairs, report: ProgressFn) -> dict[str, Any]:
        """Scores of refining coarse masks (ground truth down- and upscaled by 8) of each pair."""
        refined, coarse_pairs = [], []
        for i, rec in enumerate(pairs):
            image, gt = self.store.load(rec.id)
            coarse = coarse_labels(gt, COARSE_FACTOR)
            refined.append((refiner.refine_labels(image, coarse, ignore_index=self.ignore), gt))
            coarse_pairs.append((coarse, gt))
            report(i + 1, len(pairs), rec.id)
        scores = segmentation_scores(refined, self.classes, self.ignore)
        if pairs:
            coarse = segmentation_scores(coarse_pairs, self.classes, self.ignore)
            scores["coarse"] = {"miou": coarse["miou"], "mba": coarse["mba"]}
        return scores

    def export(self, folder: Path, *, name: str, parent: str, metrics: dict, training: dict) -> Path:
        from engine.refine import Refiner

        return Refiner(self.model.cpu(), device="cpu").save(folder, name=name, parent=parent, metrics=metrics,
                                                           training=training)


# --- helpers -------------------------------------------------------------------------------


def extend_classes(state: dict[str, torch.Tensor], config, num_classes: int):
    """The state and config of ``config``'s model with ``num_classes`` classes, old weights kept.

    Tensors whose first dimension counts classes (the classifier's weight and bias) keep the old
    classes' rows; the new rows get the layer's usual random initialisation.
    """
    from dataclasses import replace

    from engine.models import create_model

    if config.decoder == "dupsampling":
        # W is a PCA basis of the training labels' class patches: a new class needs a new basis,
        # which would change every old class's output too.
        raise FineMaskError("adding classes to a model with the DUpsampling decoder is not supported; "
                            "train it on the full class list instead")
    new_config = replace(config, num_classes=num_classes)
    fresh = create_model(new_config).state_dict()
    out = {}
    for key, new in fresh.items():
        old = state.get(key)
        if old is None:
            continue
        if old.shape == new.shape:
            out[key] = old
        elif old.dim() == new.dim() and old.shape[1:] == new.shape[1:] and old.shape[0] == config.num_classes:
            grown = new.clone()
            grown[: old.shape[0]] = old
            out[key] = grown
        else:
            raise FineMaskError(f"cannot extend {key!r} from {tuple(old.shape)} to {tuple(new.shape)}")
    return out, new_config


def segmentation_scores(pairs: list[tuple[np.ndarray, np.ndarray]], classes: list[str],
                        ignore: int | None) -> dict[str, Any]:
    """mIoU (over classes seen in prediction or truth), mean multi-class mBA and pixel accuracy, in percent."""
    if not pairs:
        return {"miou": None, "mba": None, "pixel_accuracy": None, "pairs": 0, "per_class_iou": {}}
    n = len(classes)
    cm = np.zeros((n + 1, n + 1), np.int64)
    bas = []
    for pred, gt in pairs:
        cm += confusion_matrix_open(pred, gt, n, ignore)
        ba = boundary_accuracy_multiclass(pred, gt, void=ignore)
        if not np.isnan(ba):
            bas.append(ba)
    per_class = miou(cm)[1][:n]
    seen = ~np.isnan(per_class)
    labelled = int(cm[:n].sum())
    return {
        "miou": round(100 * float(per_class[seen].mean()), 2) if seen.any() else None,
        "mba": round(100 * float(np.mean(bas)), 2) if bas else None,
        "pixel_accuracy": round(100 * float(np.trace(cm[:n, :n])) / labelled, 2) if labelled else None,
        "pairs": len(pairs),
        "per_class_iou": {c: round(100 * float(v), 2) for c, v in zip(classes, per_class) if not np.isnan(v)},
    }


def coarse_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """``labels`` downscaled by ``factor`` and upscaled back (nearest): a blocky coarse mask."""
    h, w = labels.shape
    small = resize_labels(labels, (max(1, h // factor), max(1, w // factor)))
    return resize_labels(small, (h, w)).astype(labels.dtype)


def _class_names(card: ModelCard, store: Store, num_classes: int) -> tuple[list[str], list[list[int]]]:
    """Class names (the store's where it names a class, else the base's, else ``class N``) and colours."""
    store_names = store.class_names or []
    names = [store_names[i] if i < len(store_names) else card.classes[i] if i < len(card.classes) else f"class {i}"
             for i in range(num_classes)]
    extra = default_palette(max(num_classes, 1))
    palette = [list(map(int, c)) for c in card.palette[:num_classes]]
    palette += [list(map(int, c)) for c in extra[len(palette):num_classes]]
    return list(names[:num_classes]), palette


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _run_key(base_path: Path, store_hash: str, cfg: FinetuneConfig, loop: LoopConfig) -> str:
    digest = hashlib.sha256()
    hash_file(base_path / "model.safetensors", digest)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("name", "time_budget_s")}
    digest.update(json.dumps([store_hash, settings, loop.batch_size], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _phase(report: ProgressFn, what: str) -> ProgressFn:
    return lambda done, total, item: report(done, total, f"{what} ({done}/{total})")


def _with_eta(report: ProgressFn, cfg: FinetuneConfig) -> ProgressFn:
    """Adds the ETA (from the step rate of this sitting, capped by the time budget) to the message.

    The sitting starts when this is made (just before the training loop), so the first step's
    report already has a rate (its time includes the loop's set-up: an estimate on the safe side)."""
    created = time.perf_counter()
    start: list[tuple[float, int]] = []

    def progress(step: int, total: int, message: str) -> None:
        now = time.perf_counter()
        if not start:
            start.append((created, step - 1))
        t0, s0 = start[0]
        rate = (now - t0) / max(step - s0, 1)
        eta = rate * (total - step)
        if cfg.time_budget_s is not None:
            eta = min(eta, max(0.0, cfg.time_budget_s - (now - t0)))
        report(step, total, f"step {step}/{total} · {message} · ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    return progress


__all__ = ["FinetuneConfig", "FinetuneResult", "extend_classes", "finetune", "list_versions", "models_dir",
           "next_version_name", "segmentation_scores"]
