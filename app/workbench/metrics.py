"""Model-card metrics in one scale (percent) and the short lines the front ends show.

Cards hold metrics written by two tools: ``finemask evaluate --record`` stores fractions (0..1)
under a key per test set (``camvid_val``: ``{"miou": 0.578, ...}``); fine-tuning stores
``{"before": {...}, "after": {...}}`` in percent. :func:`percent_metrics` reads either into
percent, so no front end guesses: in an evaluation entry, every value of a ``miou``/``mba``/
``iou``/``accuracy`` key (``per_class_iou``, ``iou_before``, ``pixel_accuracy``, ...) that is at
most 1.0 is a fraction and is multiplied by 100. Converted entries are marked ``"scale":
"percent"``, so converting twice changes nothing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.checkpoints import ModelCard

#: Substrings of the metric names that are rates (fractions or percentages).
RATE_KEYS = ("miou", "mba", "iou", "accuracy")
#: The mark of an entry known to be in percent.
SCALE_KEY, PERCENT = "scale", "percent"
#: Entries fine-tuning writes, in percent by its contract (``training.finetune.FinetuneResult``).
FINETUNE_KEYS = ("before", "after")
#: The mark of a fine-tuned version that scores below the model it was fine-tuned from.
BELOW_PARENT = "⚠ below its parent"


def is_rate(key: str) -> bool:
    """Whether a metric name is a rate (mIoU, mBA, IoU, accuracy) that the scale applies to."""
    key = key.lower()
    return any(part in key for part in RATE_KEYS)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_percent(value: Any, rate: bool) -> Any:
    """``value`` with fractions of rate keys scaled to percent (dicts and lists recursively)."""
    if isinstance(value, Mapping):
        return {k: _to_percent(v, rate or is_rate(str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_percent(v, rate) for v in value]
    if rate and _number(value) and 0.0 <= value <= 1.0:
        return round(100.0 * float(value), 4)
    return value


def percent_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """A card's metrics with every rate in percent (see the module docstring); the input is unchanged."""
    out: dict[str, Any] = {}
    for key, entry in (metrics or {}).items():
        if key in FINETUNE_KEYS or not isinstance(entry, Mapping) or entry.get(SCALE_KEY) == PERCENT:
            out[key] = entry
        else:
            out[key] = {**_to_percent(entry, False), SCALE_KEY: PERCENT}
    return out


def percent_card(card: ModelCard) -> ModelCard:
    """A copy of ``card`` whose metrics are in percent (the file is not touched)."""
    return dataclasses.replace(card, metrics=percent_metrics(card.metrics))


def _pct(value: Any) -> float | None:
    return float(value) if _number(value) else None


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def below_parent(card: ModelCard | None) -> bool:
    """Whether a fine-tuned version scores below its parent on the same validation data: its
    mIoU after fine-tuning (or, with no mIoU, its pixel accuracy) is lower than before."""
    if card is None:
        return False
    metrics = percent_metrics(card.metrics)
    before, after = metrics.get("before"), metrics.get("after")
    return isinstance(before, Mapping) and isinstance(after, Mapping) and scored_lower(before, after)


def scored_lower(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether ``after`` scores below ``before`` (mIoU, or pixel accuracy where there is no mIoU)."""
    for key in ("miou", "pixel_accuracy"):
        b, a = _pct(before.get(key)), _pct(after.get(key))
        if b is not None and a is not None:
            return a < b
    return False


def metrics_summary(card: ModelCard) -> str:
    """One short line: "mIoU 57.8" for an evaluated card, "mIoU 20.0 → 25.5" for a fine-tuned one,
    "mIoU 40.0 → 31.2 · ⚠ below its parent" for one that got worse."""
    metrics = percent_metrics(card.metrics)
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        b, a = _pct(before.get("miou")), _pct(after.get("miou"))
        if b is None and a is None and not (after.get("pairs") or before.get("pairs")):
            return ""  # no validation pairs: nothing was scored
        flag = f" · {BELOW_PARENT}" if below_parent(card) else ""
        return f"mIoU {_shown(b)} → {_shown(a)}{flag}"  # a score missing from the card shows as n/a
    for value in metrics.values():
        if isinstance(value, Mapping) and _pct(value.get("miou")) is not None:
            return f"mIoU {value['miou']:.1f}"
    return ""


def evaluation_line(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Before/after scores of a fine-tuning run (percent), e.g. "mIoU 40.0 → 45.2 on 3 validation
    pairs", or "... on the held-back strip of 2 training pairs" for a store without validation pairs."""
    pairs = int(after.get("pairs", before.get("pairs", 0)) or 0)
    if pairs == 0:
        return "no validation pairs yet: the store puts about 1 pair in 5 aside for validation"
    parts = []
    for key, label in (("miou", "mIoU"), ("mba", "mBA"), ("pixel_accuracy", "pixel acc.")):
        b, a = _pct(before.get(key)), _pct(after.get(key))
        if b is not None and a is not None:
            parts.append(f"{label} {b:.1f} → {a:.1f}")
    plural = "s" if pairs != 1 else ""
    held = after.get("validation") or before.get("validation")
    where = f"the {held} of {pairs} training pair{plural}" if held else f"{pairs} validation pair{plural}"
    flag = f" ({BELOW_PARENT})" if scored_lower(before, after) else ""
    return (", ".join(parts) or "no scores") + f" on {where}{flag}"


def metrics_details(card: ModelCard | None) -> str:
    """A few lines describing a model: task, classes, scores (percent), parent."""
    if card is None:
        return "not installed"
    lines = [f"{card.name}: {card.task}" + (f", {len(card.classes)} classes" if card.classes else "")]
    metrics = percent_metrics(card.metrics)
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        lines.append(evaluation_line(before, after))
    else:
        for key, value in metrics.items():
            if isinstance(value, Mapping):
                parts = [f"{label} {value[k]:.1f}" for k, label in
                         (("miou", "mIoU"), ("mba", "mBA"), ("pixel_accuracy", "pixel acc."))
                         if _pct(value.get(k)) is not None]
                if parts:
                    lines.append(f"{key}: " + ", ".join(parts))
    if card.parent:
        lines.append(f"fine-tuned from {Path(str(card.parent)).name}")
    return "\n".join(lines)


__all__ = ["BELOW_PARENT", "below_parent", "evaluation_line", "is_rate", "metrics_details", "metrics_summary",
           "percent_card", "percent_metrics", "scored_lower"]
