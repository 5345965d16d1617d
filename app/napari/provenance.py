"""Where a layer comes from, as the dock records it in layer metadata (no Qt here).

A FineMask Labels layer keeps, under ``metadata["finemask"]``: ``image_id`` (the ``unique_id`` of
the Image layer it was made from; names change, ids do not), ``origin`` ("predicted", "refined",
"corrected"), ``refined_from`` (the Labels layer an untouched refinement came from) and ``pair``
(the store pair it was saved to or read from). These rules answer the dock's questions: which
image a layer belongs to, what Refine starts from, and whether saving over a pair needs asking.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from napari.layers import Image, Labels


def find(layers: Iterable[Any], match: Callable[[Any], bool]) -> Any:
    """The first layer ``match`` accepts, else None."""
    return next((layer for layer in layers if match(layer)), None)


def mark_corrected(info: dict, event: Any = None) -> None:
    """Paint events of a FineMask Labels layer: its labels now count as "corrected", and the
    segmentation's class probabilities no longer describe them (Refine then goes without, as in
    the web app); a painted refinement is the user's own labels, refined as they are."""
    info["origin"] = "corrected"
    info.pop("probs", None)
    info.pop("refined_from", None)


def refine_source(layers: Iterable[Any], labels: Labels) -> Labels:
    """What Refine refines for the working labels: an untouched refinement's own source (so trying
    another mode starts from the segmentation again, never from a refinement), else the labels."""
    info = labels.metadata.get("finemask", {})
    if info.get("origin") == "refined" and info.get("refined_from"):
        source = find(layers, lambda x: x.unique_id == info["refined_from"])
        if isinstance(source, Labels):
            return source
    return labels


def image_for(layers: Any, labels: Labels, chosen: Image | None) -> Image | None:
    """The Image layer ``labels`` belong to: the one they were made from, else ``chosen``."""
    info = labels.metadata.get("finemask", {})
    made_from = find(layers, lambda x: isinstance(x, Image) and x.unique_id == info.get("image_id"))
    if made_from is not None:
        return made_from
    name = info.get("image_layer")  # layers made before image ids were recorded
    if name is not None and name in layers and isinstance(layers[name], Image):
        return layers[name]
    return chosen


def belongs_to(labels: Labels, image_layer: Image, store_root: str, pair_id: str) -> bool:
    """Whether saving ``labels`` over the pair's labels needs no question: the layer was saved to
    or read from that pair, or FineMask made it from that image (its segmentation, a refinement or
    a correction of it)."""
    info = labels.metadata.get("finemask", {})
    if info.get("pair") == {"store": str(store_root), "id": pair_id}:
        return True
    return info.get("image_id") is not None and info.get("image_id") == image_layer.unique_id


def workable_images(layers: Iterable[Any]) -> list[Image]:
    """Image layers FineMask segments: 2-D grey or RGB, not its own uncertainty maps."""
    return [layer for layer in layers if isinstance(layer, Image)
            and not layer.metadata.get("finemask_uncertainty") and layer.ndim == 2]


def workable_labels(layers: Iterable[Any]) -> list[Labels]:
    """Labels layers one can work on: all but FineMask's "what changed" views."""
    return [layer for layer in layers if isinstance(layer, Labels) and not layer.metadata.get("finemask_changes")]
