"""engine.segment: full-size results from a tiny random DSRL model, any input size, from files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.checkpoints import ModelCard, save_checkpoint
from engine.errors import FineMaskError
from engine.io import write_image
from engine.models import SegmenterConfig, create_model
from engine.segment import Segmenter

TINY = dict(encoder_width=0.25, aspp_channels=16, low_level_channels=8, decoder_channels=16,
            head_channels=8, sr_channels=8, ft_channels=8)


def _saved_model(tmp_path, variant="dsrl", classes=3, input_size=(64, 48)):
    torch.manual_seed(0)
    model = create_model(SegmenterConfig.for_variant(variant, classes, **TINY))
    card = ModelCard(name="tiny", task="segmentation", architecture="dsrl", config=model.config.to_dict(),
                     classes=[f"c{i}" for i in range(classes)], palette=[[i, i, i] for i in range(classes)],
                     input_size=list(input_size))
    return save_checkpoint(tmp_path / "tiny", model.state_dict(), card), model


@pytest.mark.parametrize("shape", [(50, 70), (71, 33), (5, 9), (48, 64)])
def test_predict_full_size_any_shape(tmp_path, shape):
    folder, _ = _saved_model(tmp_path)
    seg = Segmenter.from_pretrained(folder)
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    res = seg.predict(image)
    assert res.labels.shape == shape and res.probs.shape == (3, *shape) and res.probs.dtype == np.float16
    assert max(res.working_size) == 64
    np.testing.assert_allclose(res.probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    chosen = np.take_along_axis(res.probs, res.labels[None].astype(np.int64), 0)[0]
    np.testing.assert_allclose(chosen, res.probs.max(0), atol=2e-3)  # labels are the argmax (float16 ties)
    assert np.all((res.uncertainty >= 0) & (res.uncertainty <= 1))


def test_prediction_is_the_inference_network_on_the_resized_image(tmp_path):
    folder, model = _saved_model(tmp_path)
    seg = Segmenter.from_pretrained(folder)
    image = np.random.default_rng(1).random((48, 64, 3), dtype=np.float32)  # already the working size
    res = seg.predict(image)
    with torch.no_grad():  # the training model in eval mode computes the same logits
        logits = model.eval()(torch.from_numpy(image).permute(2, 0, 1)[None]).logits
    assert logits.shape[-2:] == (96, 128)
    # 2x probabilities brought back to the input size (an exact 2x2 average here)
    expected = F.interpolate(logits.softmax(1), size=(48, 64), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(res.probs.astype(np.float32), expected.numpy(), atol=1e-3)


def test_batch_equals_single_and_files_work(tmp_path):
    folder, _ = _saved_model(tmp_path, variant="baseline")
    seg = Segmenter.from_pretrained(folder)
    rng = np.random.default_rng(2)
    images = [rng.random((40, 60, 3), dtype=np.float32), rng.random((30, 45, 3), dtype=np.float32),
              rng.random((20, 20, 3), dtype=np.float32)]
    batch = seg.predict_batch(images)
    for im, res in zip(images, batch):
        np.testing.assert_allclose(res.probs, seg.predict(im).probs, atol=2e-3)
    path = write_image(tmp_path / "a.png", (images[0] * 255).astype(np.uint8))
    assert seg.predict(path).labels.shape == (40, 60)


def test_inference_model_has_no_training_branches(tmp_path):
    folder, model = _saved_model(tmp_path)
    seg = Segmenter.from_pretrained(folder)
    names = set(seg.model.state_dict())
    assert names < set(model.state_dict())
    assert not any(n.startswith(("sisr.", "feature_transform.")) for n in names)


def test_bad_models_and_inputs(tmp_path):
    folder, _ = _saved_model(tmp_path)
    seg = Segmenter.from_pretrained(folder)
    with pytest.raises(FineMaskError, match="too small"):
        seg.predict(np.zeros((10, 10, 3), np.float32), working_size=4)
    with pytest.raises(FineMaskError, match="not found"):
        seg.predict(tmp_path / "nope.png")
    other = create_model(SegmenterConfig.for_variant("dsrl", 5, **TINY))
    card = ModelCard(name="x", task="segmentation", architecture="dsrl",
                     config=SegmenterConfig.for_variant("dsrl", 3, **TINY).to_dict())
    bad = save_checkpoint(tmp_path / "bad", other.state_dict(), card)
    with pytest.raises(FineMaskError, match="do not match"):
        Segmenter.from_pretrained(bad)
