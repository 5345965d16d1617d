"""Feature-affinity loss (against a naive double loop, chunking, memory) and the DSRL loss."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.models import DSRLOutput
from training.losses import dsrl_loss, fa_rows_per_block, feature_affinity_loss
from training.sr_target import residual_target

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def naive_fa(f_seg, f_sr, stride):
    """Literal O(N^2) definition: pool by explicit block means, normalise, loop over pairs."""
    batch, _, h, w = f_seg.shape
    total = 0.0
    for b in range(batch):
        vectors = []
        for f in (f_seg[b], f_sr[b]):
            pooled = [f[:, y:y + stride, x:x + stride].mean(dim=(1, 2))
                      for y in range(0, h - stride + 1, stride) for x in range(0, w - stride + 1, stride)]
            vectors.append([v / v.norm() for v in pooled])
        seg, sr = vectors
        n = len(seg)
        for i in range(n):
            for j in range(n):
                total += abs(float(seg[i] @ seg[j]) - float(sr[i] @ sr[j]))
    return total / (batch * n * n)


def dense_fa(f_seg, f_sr, stride):
    a = F.normalize(F.avg_pool2d(f_seg, stride).flatten(2), dim=1)
    b = F.normalize(F.avg_pool2d(f_sr, stride).flatten(2), dim=1)
    return (a.transpose(1, 2) @ a - b.transpose(1, 2) @ b).abs().mean()


@pytest.mark.parametrize("h, w, stride", [(16, 24, 4), (24, 16, 4), (18, 10, 2)])
def test_fa_equals_naive_double_loop(h, w, stride):
    torch.manual_seed(0)
    f_seg, f_sr = torch.randn(2, 5, h, w), torch.randn(2, 3, h, w)  # channel counts may differ
    expected = naive_fa(f_seg.double(), f_sr.double(), stride)
    assert feature_affinity_loss(f_seg, f_sr, stride).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("block_elements", [24, 5 * 24 + 3, 24 * 24])
def test_blocked_fa_matches_dense_value_and_gradients(block_elements):
    torch.manual_seed(1)
    f_seg = torch.randn(2, 6, 16, 24, requires_grad=True)
    f_sr = torch.randn(2, 4, 16, 24, requires_grad=True)
    loss = feature_affinity_loss(f_seg, f_sr, 4, block_elements=block_elements)
    grads = torch.autograd.grad(loss, (f_seg, f_sr))
    ref = dense_fa(f_seg, f_sr, 4)
    ref_grads = torch.autograd.grad(ref, (f_seg, f_sr))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)


def test_fa_is_zero_for_identical_affinities_and_rejects_mismatched_maps():
    f = torch.rand(1, 4, 16, 16)
    assert feature_affinity_loss(f, 3.0 * f, 8).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ"):
        feature_affinity_loss(f, torch.rand(1, 4, 16, 8))
    with pytest.raises(ValueError, match="smaller"):
        feature_affinity_loss(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 4, 4), 8)


def test_fa_block_plan_for_512x1024_output_fits_in_256_mib():
    n = (512 // 8) * (1024 // 8)
    rows = fa_rows_per_block(n)
    assert rows < n  # really blocked: a whole N x N float32 matrix would be 256 MiB on its own
    assert 2 * rows * n * 4 <= 256 * 2**20  # two live blocks in forward and in backward


def test_fa_on_512x1024_output_needs_less_than_1_gib_extra():
    # Peak RSS growth of one forward+backward in a fresh process, measured on the real size.
    # The same measurement with one N x N block is run as a control that the probe sees memory.
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(1)
        from engine.memory import current_rss, peak_rss, reset_peak_rss
        from training.losses import feature_affinity_loss
        def extra(block):
            a = torch.rand(1, 16, 512, 1024, requires_grad=True)
            b = torch.rand(1, 16, 512, 1024, requires_grad=True)
            reset_peak_rss()
            base = current_rss()
            feature_affinity_loss(a, b, 8, **block).backward()
            return peak_rss() - base
        feature_affinity_loss(torch.rand(1, 4, 64, 64), torch.rand(1, 4, 64, 64)).item()
        print(extra({}), extra({'block_elements': 8192 * 8192}))
    """)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    blocked, whole = (int(v) for v in result.stdout.split())
    assert blocked < 2**30
    assert whole > blocked + 256 * 2**20


def make_output(batch=2, h=16, w=24, classes=3, sr=True, features=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DSRLOutput(
        torch.randn(batch, classes, h, w, generator=g, requires_grad=True),
        torch.rand(batch, 3, h, w, generator=g, requires_grad=True) if sr else None,
        torch.rand(batch, 4, h, w, generator=g) if features else None,
        torch.rand(batch, 4, h, w, generator=g) if features else None,
    )


def test_dsrl_loss_is_ce_plus_weighted_mse_plus_fa():
    out = make_output()
    labels = torch.randint(0, 3, (2, 16, 24))
    labels[0, :5] = 255
    hr = torch.rand(2, 3, 16, 24)
    loss = dsrl_loss(out, labels, hr, fa_stride=4)
    valid = labels != 255
    logp = F.log_softmax(out.logits, 1).permute(0, 2, 3, 1)[valid]
    ce = -logp.gather(1, labels[valid][:, None]).mean()
    torch.testing.assert_close(loss.ce, ce)
    torch.testing.assert_close(loss.sr, ((out.sr - hr) ** 2).mean())
    torch.testing.assert_close(loss.fa, feature_affinity_loss(out.f_seg, out.f_sr, 4))
    torch.testing.assert_close(loss.total, ce + 0.1 * loss.sr + 1.0 * loss.fa)
    custom = dsrl_loss(out, torch.where(labels == 255, 7, labels) , hr, ignore_index=7, sr_weight=0.5,
                       fa_weight=2.0, fa_stride=4)
    torch.testing.assert_close(custom.total, ce + 0.5 * loss.sr + 2.0 * loss.fa)


def test_residual_target_mse_and_missing_inputs():
    out = make_output(h=16, w=24)
    lr, hr = torch.rand(2, 3, 8, 12), torch.rand(2, 3, 16, 24)
    labels = torch.randint(0, 3, (2, 16, 24))
    loss = dsrl_loss(out, labels, hr, lr=lr, sr_target="residual", fa_stride=4)
    torch.testing.assert_close(loss.sr, ((out.sr - residual_target(hr, lr)) ** 2).mean())
    with pytest.raises(ValueError, match="LR"):
        dsrl_loss(out, labels, hr, sr_target="residual")
    with pytest.raises(ValueError, match="HR"):
        dsrl_loss(out, labels)
    with pytest.raises(ValueError, match="labels"):
        dsrl_loss(out, labels[:, :8], hr)


def test_all_void_batch_gives_zero_ce_and_absent_terms_are_zero():
    out = make_output(sr=False, features=False)
    loss = dsrl_loss(out, torch.full((2, 16, 24), 255))
    assert loss.ce.item() == 0.0 and loss.sr.item() == 0.0 and loss.fa.item() == 0.0
    loss.total.backward()  # still differentiable
    assert torch.isfinite(out.logits.grad).all()


def test_class_weights_give_the_weighted_mean_ce():
    out = make_output(sr=False, features=False)
    labels = torch.randint(0, 3, (2, 16, 24))
    labels[1, :4] = 255
    weights = torch.tensor([0.5, 2.0, 4.0])
    loss = dsrl_loss(out, labels, class_weights=weights)
    valid = labels != 255
    logp = F.log_softmax(out.logits, 1).permute(0, 2, 3, 1)[valid]
    w = weights[labels[valid]]
    expected = -(w * logp.gather(1, labels[valid][:, None])[:, 0]).sum() / w.sum()
    torch.testing.assert_close(loss.ce, expected)
    assert not torch.allclose(loss.ce, dsrl_loss(out, labels).ce)


def test_median_frequency_weights_balance_rare_classes():
    from training.train_dsrl import median_frequency_weights

    class Labels:
        """Two 10x10 label maps: class 2 only in the second, class 3 never, void in the first."""

        def __init__(self):
            a = np.zeros((10, 10), np.uint8)
            a[:5] = 1
            a[9] = 255
            b = np.zeros((10, 10), np.uint8)
            b[0, :4] = 2
            self.maps = [a, b]

        def __len__(self):
            return 2

        def load_labels(self, i):
            return self.maps[i]

    w = median_frequency_weights(Labels(), 4, 255)
    # freq: class 0 (40 + 96) / 190, class 1 50 / 90, class 2 4 / 100, class 3 absent
    freq = np.array([136 / 190, 50 / 90, 4 / 100])
    np.testing.assert_allclose(w[:3].numpy(), np.median(freq) / freq, rtol=1e-6)
    assert w[3] == 0 and w[2] > w[1] > w[0]


def test_enet_weights_are_bounded_and_favour_rare_classes():
    from training.train_dsrl import cross_entropy_weights

    class Labels:
        classes = ["a", "b", "c"]
        ignore_index = 255

        def __len__(self):
            return 1

        def load_labels(self, i):
            labels = np.zeros((100, 100), np.uint8)
            labels[:10] = 1  # 10% of the labelled pixels
            labels[10, :1] = 2  # 1 pixel
            labels[50:] = 255  # void, not counted
            return labels

    w = cross_entropy_weights("enet", Labels())
    share = np.array([3999, 1000, 1]) / 5000
    np.testing.assert_allclose(w.numpy(), 1 / np.log(1.02 + share), rtol=1e-6)
    assert w[2] < 1 / np.log(1.02) + 1e-3 and w[2] > w[1] > w[0]
    assert cross_entropy_weights("none", Labels()) is None
    with pytest.raises(ValueError, match="none, median or enet"):
        cross_entropy_weights("inverse", Labels())
