"""Turn a training run into a FineMask model folder, evaluated, with a card."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.checkpoints import ModelCard

from .data.registry import load_dataset
from .evaluate import evaluate_segmenter, segmenter_from_training_model
from .resume import load_state
from .train_dsrl import DATA_TERMS, export_segmenter, load_train_config

ProgressFn = Callable[[int, int, str], None]


def export_dsrl_run(
    run_dir: str | Path,
    to: str | Path,
    *,
    name: str,
    input_size: tuple[int, int],
    command: str = "",
    evaluate: bool = True,
    half: bool = True,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> Path:
    """Export ``run_dir``'s latest state to ``to``; with ``evaluate`` the card holds val mIoU.

    ``input_size`` is the working size (width, height).
    """
    from engine.models import SegmenterConfig, create_model

    cfg = load_train_config(run_dir)
    state = load_state(Path(run_dir) / "state")
    train = load_dataset(cfg.data, "train")
    config = SegmenterConfig.for_variant(cfg.variant, len(train.classes), encoder=cfg.encoder,
                                         output_stride=cfg.output_stride, **cfg.model)
    model = create_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    metrics = {}
    if evaluate:
        val = load_dataset(cfg.data, "val")
        card = ModelCard(name=name, task="segmentation", architecture="dsrl", config=config.to_dict(),
                         classes=train.classes, palette=train.palette, input_size=list(input_size))
        scores = evaluate_segmenter(segmenter_from_training_model(model, card), val, on_progress=on_progress)
        metrics = {f"{cfg.data}_val": scores.as_dict()}
    training = {
        "data": f"{cfg.data} train split ({len(train)} images)",
        "terms": DATA_TERMS.get(cfg.data, "see the dataset's terms"),
        "variant": cfg.variant,
        "class_weighting": cfg.class_weighting,
        "steps": int(state["step"]),
        "batch_size": cfg.loop.batch_size,
        "crop": list(cfg.crop),
        "pretrained": cfg.pretrained or "none",
        "command": cfg.command or "(not recorded)",
        "export_command": command,
    }
    return export_segmenter(model, to, name=name, classes=train.classes, palette=train.palette,
                            input_size=input_size, training=training, metrics=metrics, half=half,
                            overwrite=overwrite)


def export_refine_run(
    run_dir: str | Path,
    to: str | Path,
    *,
    name: str,
    command: str = "",
    metrics: dict | None = None,
    half: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a refinement run's latest state to the model folder ``to``."""
    import json

    from engine.models.cascadepsp import RefinerConfig, build_refinement_module

    from .train_refine import export_refiner

    cfg = json.loads((Path(run_dir) / "train_config.json").read_text())
    state = load_state(Path(run_dir) / "state")
    model = build_refinement_module(RefinerConfig(backbone=cfg["backbone"], **cfg.get("model", {})))
    model.load_state_dict(state["model"])
    training = {
        "sources": list(cfg["sources"]),
        "steps": int(state["step"]),
        "batch_size": cfg["loop"]["batch_size"],
        "pretrained": cfg.get("pretrained") or "none",
        "command": cfg.get("command") or "(not recorded)",
        "export_command": command,
    }
    return export_refiner(model, to, name=name, training=training, metrics=metrics, half=half, overwrite=overwrite)


def run_kind(run_dir: str | Path) -> str:
    """``"dsrl"`` or ``"refine"``: what the run in ``run_dir`` trains."""
    import json

    from engine.errors import FineMaskError

    path = Path(run_dir) / "train_config.json"
    if not path.is_file():
        raise FineMaskError("not a training run folder (no train_config.json)", Path(run_dir))
    return "refine" if "backbone" in json.loads(path.read_text()) else "dsrl"
