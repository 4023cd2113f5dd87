"""BatchNorm over the global batch of a data-parallel step (torch's SyncBatchNorm runs on GPUs only).

``GlobalBatchNorm1d`` is ``nn.BatchNorm1d`` on ``(N, C)`` inputs; when given a distributed ``World`` and in training
mode, its statistics are those of every rank's rows together: with per-rank sums ``s_r = sum x``, ``q_r = sum x^2``
and counts ``n_r`` gathered (with gradient), ``mean = sum s / sum n`` and ``var = sum q / sum n - mean^2``
(biased, used to normalise; the running variance takes the unbiased ``var * n / (n - 1)``, as BatchNorm does).
One process, or eval mode, is exactly ``nn.BatchNorm1d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xmcl.nn import dense
from xmcl.runtime.distributed import SINGLE_PROCESS, World, gather_with_grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics span the ranks of ``world`` (see the module docstring)."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.world: World = SINGLE_PROCESS

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.world.distributed):
            return super().forward(x)
        count = x.new_full((1,), float(x.shape[0]))
        stats = gather_with_grad(torch.cat([x.sum(0), (x * x).sum(0), count])[None], self.world).sum(0)
        channels = self.num_features
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels: 2 * channels] / total - mean * mean).clamp(min=0.0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1.0), momentum)
                self.num_batches_tracked.add_(1)
        normalised = (x - mean) * torch.rsqrt(var + self.eps)
        return normalised * self.weight + self.bias if self.affine else normalised


def batchnorm_of_linear(linear: nn.Linear, norm: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """``norm(linear(x))``; with ``norm`` in training mode, the product is taken without ``linear``'s bias ``b``: the
    batch mean the norm subtracts cancels it, so it changes no output and its gradient is 0 (here exactly: it enters
    the graph as ``W + 0 b``, so that data-parallel training sees every parameter used; the layers' own form gives it
    rounding noise). The running mean, which must follow the mean of ``linear(x)`` for eval mode, gets ``b`` by a
    shift around the update: ``(r - b)(1 - m) + m mean(x W^T) + b = (1 - m) r + m mean(x W^T + b)``."""
    if linear.bias is None or not norm.training:
        return norm(linear(x))
    weight = linear.weight + (linear.bias * 0).unsqueeze(1)
    if norm.running_mean is None:
        return norm(dense.linear(x, weight))
    # the norm runs on a shifted copy of its running mean: the autograd graph may keep the one it was given
    running_mean, bias = norm.running_mean, linear.bias.detach()
    norm.running_mean = running_mean - bias
    try:
        return norm(dense.linear(x, weight))
    finally:
        shifted, norm.running_mean = norm.running_mean, running_mean
        running_mean.copy_(shifted + bias)


def fold_batchnorm(linear: nn.Linear, norm: nn.BatchNorm1d, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(W', b')`` with ``x W'^T + b' = scale * norm(linear(x))`` for ``norm`` in eval mode (running statistics):
    with ``r = gamma / sqrt(running_var + eps)``, ``W' = scale * r W`` (row-wise) and
    ``b' = scale * (r (b - running_mean) + beta)``. One product then does the work of the layer and its norm."""
    rate = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean if linear.bias is None else linear.bias - norm.running_mean
    if norm.affine:
        rate = rate * norm.weight
    bias = rate * shift + norm.bias if norm.affine else rate * shift
    return linear.weight * (scale * rate).unsqueeze(1), scale * bias


def set_world(module: nn.Module, world: World) -> None:
    """Give every ``GlobalBatchNorm1d`` inside ``module`` the data-parallel ``world``."""
    for sub in module.modules():
        if isinstance(sub, GlobalBatchNorm1d):
            sub.world = world



