"""DUpsampling: PCA basis exact at full rank, SVD-optimal below it, any aspect ratio and class
count; the decoder reconstructs through the same patch layout; W is a persistent buffer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import Cancelled
from engine.models import SegmenterConfig, create_model, fit_basis
from engine.models.dupsampling import default_basis, label_patches, reconstruct

torch.set_num_threads(1)


def blob_labels(shape, num_classes, seed, void_fraction=0.0):
    """Piecewise-constant label maps (coarse random grid, nearest-upsampled) with optional void."""
    rng = np.random.default_rng(seed)
    *lead, h, w = shape
    coarse = rng.integers(0, num_classes, size=(*lead, h // 3 + 1, w // 3 + 1))
    labels = coarse.repeat(3, axis=-2).repeat(3, axis=-1)[..., :h, :w]
    noise = rng.random(labels.shape) < 0.1
    labels = np.where(noise, rng.integers(0, num_classes, size=labels.shape), labels)
    labels[rng.random(labels.shape) < void_fraction] = 255
    return labels.astype(np.uint8)


def patch_matrix(maps, num_classes, ratio):
    return torch.cat([b for m in maps for b in label_patches(m, num_classes, ratio)])


@pytest.mark.parametrize(
    "maps_shapes, num_classes, ratio",
    [([(24, 40)], 3, 4), ([(40, 24)], 3, 4), ([(16, 48), (36, 20)], 5, 2), ([(22, 34)], 2, 4)],
)
def test_full_rank_basis_is_exact(maps_shapes, num_classes, ratio):
    maps = [blob_labels(s, num_classes, i, void_fraction=0.05) for i, s in enumerate(maps_shapes)]
    dim = ratio * ratio * num_classes
    w = fit_basis(maps, num_classes, ratio, dim).double()
    assert w.shape == (dim, dim)
    torch.testing.assert_close(w @ w.t(), torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    x = patch_matrix(maps, num_classes, ratio)
    torch.testing.assert_close(x @ w.t() @ w, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes, ratio, shape", [(3, 4, (2, 24, 40)), (6, 2, (3, 30, 14))])
def test_truncated_basis_has_the_svd_truncation_error(num_classes, ratio, shape):
    labels = blob_labels(shape, num_classes, seed=7)
    x = patch_matrix(list(labels), num_classes, ratio)
    singular = torch.linalg.svdvals(x)
    rank = int((singular > 1e-9 * singular[0]).sum())
    errors = []
    for k in (1, 3, rank // 2, rank - 1):
        w = fit_basis(labels, num_classes, ratio, k).double()
        error = ((x - x @ w.t() @ w) ** 2).sum()
        optimum = (singular[k:] ** 2).sum()
        torch.testing.assert_close(error, optimum, rtol=1e-4, atol=1e-6)
        # and it beats a label-free orthonormal basis of the same size
        d = default_basis(num_classes, ratio, k).double()
        assert error <= ((x - x @ d.t() @ d) ** 2).sum() + 1e-6
        errors.append(float(error))
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0


@pytest.mark.parametrize("h, w, num_classes, ratio", [(16, 40, 3, 4), (40, 16, 7, 4), (24, 8, 2, 8)])
def test_decoder_layout_reconstructs_non_square_one_hot_maps(h, w, num_classes, ratio):
    labels = blob_labels((h, w), num_classes, seed=3, void_fraction=0.05)
    basis = fit_basis(labels, num_classes, ratio, ratio * ratio * num_classes)
    lab = torch.as_tensor(labels).long()
    onehot = F.one_hot(lab.clamp(max=num_classes - 1), num_classes).permute(2, 0, 1)[None].float()
    onehot = onehot * (lab < num_classes)
    codes = F.conv2d(F.pixel_unshuffle(onehot, ratio), basis[:, :, None, None])  # project: W x
    torch.testing.assert_close(reconstruct(codes, basis, ratio), onehot, atol=1e-5, rtol=0)


def test_default_basis_is_orthonormal_and_starts_as_nearest_upsampling():
    ratio, num_classes, channels = 4, 3, 20
    basis = default_basis(num_classes, ratio, channels).double()
    torch.testing.assert_close(basis @ basis.t(), torch.eye(channels, dtype=torch.float64), atol=1e-6, rtol=0)
    scores = torch.randn(2, num_classes, 3, 5, dtype=torch.float64)
    codes = torch.cat([scores * ratio, torch.zeros(2, channels - num_classes, 3, 5, dtype=torch.float64)], 1)
    torch.testing.assert_close(
        reconstruct(codes, basis, ratio), F.interpolate(scores, scale_factor=ratio, mode="nearest"),
        atol=1e-6, rtol=1e-6,
    )


def test_fit_basis_rejects_impossible_requests():
    labels = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="channels"):
        fit_basis(labels, 2, 4, 33)
    with pytest.raises(ValueError, match="patch"):
        fit_basis(np.zeros((3, 9), np.uint8), 2, 4, 4)


def test_model_basis_is_a_persistent_fixed_buffer_with_temperature_parameter():
    config = SegmenterConfig.for_variant("dsrl_dup", 3, output_stride=8, encoder_width=0.25, dup_channels=24)
    model = create_model(config)
    names = dict(model.named_parameters())
    assert "decoder.basis" in model.state_dict() and "decoder.basis" not in names
    assert names["decoder.temperature"].item() == 1.0 and model.decoder.to_codes.bias is not None
    assert model.dupsampling_ratio == 8
    labels = blob_labels((2, 40, 56), 3, seed=1)
    basis = fit_basis(labels, 3, model.dupsampling_ratio, 24)
    model.set_dupsampling_basis(basis)
    assert torch.equal(model.state_dict()["decoder.basis"], basis)
    with pytest.raises(ValueError, match="shape"):
        model.set_dupsampling_basis(basis[:10])
    # The basis travels with the state dict into a fresh model.
    other = create_model(config, inference=True)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
    model.eval()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x).logits)
    deeplab = create_model(SegmenterConfig.for_variant("dsrl", 3, encoder_width=0.25))
    with pytest.raises(ValueError, match="DUpsampling"):
        deeplab.set_dupsampling_basis(basis)


def test_fit_basis_accepts_uint16_tensors_and_generators_and_reports_progress():
    labels = blob_labels((3, 20, 28), 3, seed=5, void_fraction=0.02).astype(np.uint16)
    labels[0, 0, 0] = 65535  # void in a 16-bit map
    reference = fit_basis(labels, 3, 4, 10)
    torch.testing.assert_close(fit_basis(torch.from_numpy(labels.astype(np.int32)), 3, 4, 10), reference)
    torch.testing.assert_close(fit_basis((m for m in labels), 3, 4, 10), reference)
    calls = []
    fit_basis(list(labels), 3, 4, 10, on_progress=lambda done, total, _: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(Cancelled):
        fit_basis(list(labels), 3, 4, 10, cancel=lambda: True)
