"""BatchNorm over the global batch under DistributedDataParallel, on CPU (gloo) as well as GPU.

With plain BatchNorm each process normalises by the statistics of its own share of the batch,
so N processes do not train like one process on the same global batch. PyTorch's
``SyncBatchNorm`` fixes that but runs only on GPUs; :class:`GlobalBatchNorm2d` sums the batch
statistics over processes with a differentiable all-reduce, so the gloo backend matches too.
Running statistics are updated from the global batch (unbiased variance), as in BatchNorm. The
sums are taken in float64: E[x^2] - E[x]^2 in float32 moved the first training loss by 1e-4.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every process's loss
    depends on every process's share of the statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics cover the batches of all processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        C = x.shape[1]
        xf = x.double()
        count = torch.tensor([x.numel() / C], dtype=torch.float64, device=x.device)
        stats = _SumOverProcesses.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().float(), alpha=m)
                self.running_var.mul_(1 - m).add_((var.detach() * (n / (n - 1).clamp_min(1))).float(), alpha=m)
        mean, inv_std = mean.float(), torch.rsqrt(var + self.eps).float()
        y = (x.float() - mean[None, :, None, None]) * inv_std[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def globalise_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm2d`` in ``model`` for a global one (CUDA: ``SyncBatchNorm``), in place.

    The new layers share the old ones' parameters and buffers, so optimizers built on
    ``model.parameters()`` beforehand and state-dict keys stay valid. Returns ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            on_gpu = child.weight is not None and child.weight.device.type == "cuda"
            cls = nn.SyncBatchNorm if on_gpu else GlobalBatchNorm2d
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(parent, name, new)
    return model


__all__ = ["GlobalBatchNorm2d", "globalise_batchnorm"]
