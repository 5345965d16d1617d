"""Multi-class refinement at 4K: the tile-edge cut and the arbitration rules (engine.refine.classes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.refine import Refiner, arbitrate, arbitrate_classes, plan_classes
from engine.refine_modes import REFINE_MODES, mode_options

H, W = 2848, 4288  # an IDRiD photo
TILE_EDGE = 1254 + 16  # a local-step tile of the whole-image grid (L = 900) writes from this row


def fundus_labels() -> np.ndarray:
    """Background 0, an optic disc (5) spanning several tiles and crossing ``TILE_EDGE``, a dense
    cluster of exudates (3) next to it and microaneurysm dots (1) elsewhere."""
    yy, xx = np.mgrid[0:H, 0:W]
    labels = np.zeros((H, W), np.uint8)
    labels[(yy - 1300) ** 2 + (xx - 3000) ** 2 < 600 ** 2] = 5
    rng = np.random.default_rng(0)
    for cy, cx in rng.integers((900, 1500), (1800, 2300), (60, 2)):
        labels[cy - 9:cy + 9, cx - 9:cx + 9] = 3
    for cy, cx in rng.integers((200, 200), (2600, 4000), (40, 2)):
        labels[cy - 2:cy + 2, cx - 2:cx + 2] = 1
    return labels


def per_class(ref, image, labels, probs=None, *, ignore_index=None, return_confidence=False, **kwargs):
    """The per-class path (``arbitrate_classes``): ``ref.refine`` on each refined class's box."""
    return arbitrate_classes(
        labels, probs, lambda box, mask, progress: ref.refine(image[box[0]:box[1], box[2]:box[3]], mask, **kwargs),
        ignore_index=ignore_index, return_confidence=return_confidence)


class SeamStub:
    """Stands in for a refiner reproducing what the light model did on a held-out 4K fundus: the
    whole-image background class comes back as background everywhere (its global step at 900 px
    erased the disc and the lesions), more confidently below a tile edge (tile output) than above
    it (the global step's fallback); every other class is returned as it was (0.9 inside)."""

    def __init__(self) -> None:
        self.background_calls = 0

    def adaptive_batch_size(self, *args, **kwargs):
        return 1

    def refine(self, image, mask, **kwargs):
        if mask.mean() > 0.9:  # the background (the other classes are a small part of its box)
            self.background_calls += 1
            conf = np.full(mask.shape, 0.8, np.float32)
            conf[TILE_EDGE:] = 0.99
            return conf
        return np.where(mask, 0.9, 0.05).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_large_object_is_not_cut_along_a_tile_edge_by_another_class():
    labels = fundus_labels()
    image = np.zeros((H, W, 3), np.uint8)
    stub = SeamStub()
    out = per_class(stub, image, labels)
    # The earlier rule refined the background too, and its 0.99 below the tile edge beat the disc's
    # own 0.9: the disc was cut along row TILE_EDGE and the exudate cluster hollowed out.
    for c in (1, 3, 5):
        assert _iou(out == c, labels == c) == 1.0, c
    assert stub.background_calls == 0  # the largest class is the complement: not refined


def test_a_class_takes_pixels_only_where_their_own_class_lets_go():
    labels = np.zeros((40, 60), np.uint8)
    labels[5:35, 5:30] = 1
    labels[5:35, 30:55] = 2
    plan = plan_classes(labels)
    assert plan.complement == 0 and plan.refined == [1, 2]
    conf1 = np.zeros((40, 60), np.float32)
    conf2 = np.zeros((40, 60), np.float32)
    y0, y1, x0, x1 = plan.boxes[1]
    conf1[5:35, 5:40] = 0.95  # class 1 grows 10 px into class 2 ...
    conf2[5:35, 30:55] = 0.6  # ... which keeps its pixels (0.6 > 0.5): class 2 stays
    conf2[5:20, 30:36] = 0.2  # except where class 2 lets go: class 1 claims those
    confs = [(1, conf1[y0:y1, x0:x1]), (2, conf2[slice(*plan.boxes[2][:2]), slice(*plan.boxes[2][2:])])]
    out, conf = arbitrate(labels, None, plan, confs, return_confidence=True)
    want = labels.copy()
    want[5:20, 30:36] = 1
    np.testing.assert_array_equal(out, want)
    assert conf[10, 32] == np.float32(0.95) and conf[25, 32] == np.float32(0.6)


class EchoModule(nn.Module):
    """A refinement network that returns its input mask (confident logits): the runtime's
    machinery - boxes, tile grid, selection, accumulation, fallback, arbitration - then must not
    change a mask it cannot improve."""

    def forward(self, img: torch.Tensor, seg: torch.Tensor, prev_os8: torch.Tensor | None = None):
        logits = seg * 12.0
        return {"pass3_os1": logits, "pass3_os4": logits}


@pytest.mark.parametrize("mode", list(REFINE_MODES))
def test_the_4k_pipeline_keeps_a_mask_the_network_agrees_with(mode):
    labels = fundus_labels()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    ref = Refiner(EchoModule(), device="cpu", precision="float32")
    out = ref.refine_labels(image, labels, **mode_options(mode))
    if mode == "local":  # tiles on the coarse mask itself: exactly unchanged
        np.testing.assert_array_equal(out, labels)
    else:  # the global step works at 900 px: boundaries move by about a pixel, nothing is cut
        assert _iou(out == 5, labels == 5) > 0.99
        assert _iou(out == 3, labels == 3) > 0.6
        rows = (out == 5).sum(axis=1)[TILE_EDGE - 40:TILE_EDGE + 40].astype(int)
        assert np.abs(np.diff(rows)).max() < 20  # no straight-line cut at the tile edge


@pytest.mark.parametrize("mode", list(REFINE_MODES))
def test_one_pass_equals_the_per_class_path(mode):
    """Classes sharing a box (scattered ones: the whole image) share image reads and global-step
    inputs; the result is the per-class path's, bit for bit at a tile batch of 1."""
    from engine.models.cascadepsp import RefinementModule, RefinerConfig

    h, w = 300, 420
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[60:200, 100:260] = 4  # one large object
    for c, (cy, cx) in zip([1, 2, 1, 2, 3, 3], [(20, 20), (280, 20), (280, 400), (20, 400), (150, 30), (150, 390)]):
        labels[cy - 8:cy + 8, cx - 8:cx + 8] = c  # classes 1 and 2 both span the image
    torch.manual_seed(0)
    ref = Refiner(RefinementModule(RefinerConfig(backbone="light")), device="cpu", precision="float32")
    options = {**mode_options(mode), "L": 160, "selection": "all", "batch_size": 1}
    out, conf = ref.refine_labels(image, labels, return_confidence=True, **options)
    stats = ref.stats
    want, want_conf = per_class(ref, image, labels, return_confidence=True, **options)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(conf, want_conf)
    if mode != "fast":
        plan = plan_classes(labels)
        assert plan.boxes[1] == plan.boxes[2] == (0, h, 0, w)
        # classes 1 and 2 read each of their crops once, together
        assert 0 < stats.crops < stats.tiles_processed
