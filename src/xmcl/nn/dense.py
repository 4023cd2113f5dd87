"""Affine maps of float32 rows on the CPU through oneDNN's matrix-multiply kernels.

torch sends a float32 ``addmm`` on the CPU to MKL's sgemm. For the row-major products of the towers (thousands of
rows by a 256-wide weight) oneDNN's kernels, which torch ships for its compiler (``mkldnn::_linear_pointwise``),
ran 1.2-1.5x as fast on this project's machines (``benchmarks/dense_products.py``), and they fuse a bias, an
activation or a residual into the product.
``linear`` takes them for the forward product ``y = x W^T + b`` and the input's gradient ``dx = dy W``; the
weight's gradient ``dW = dy^T x``, a long reduction over the rows, stays with MKL, which was the faster there.
Elsewhere (other devices and dtypes, CPU autocast, inside ``torch.compile``, ``torch.export`` or the ONNX tracer,
a torch without the operator) it is ``F.linear``. The products round as ``F.linear``'s do, up to the order of the
float32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"none": lambda out: out, "relu": torch.relu, "sigmoid": torch.sigmoid}
KERNEL_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _takes_kernel(x: Tensor, weight: Tensor) -> bool:
    return (KERNEL_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() >= 2 and weight.dim() == 2
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


def onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """oneDNN's ``activation(x W^T + b)`` for CPU float32 ``x (..., k)``, ``weight (n, k)`` (any strides), without
    autograd; only where ``KERNEL_AVAILABLE``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "")


class _Linear(torch.autograd.Function):
    """``x W^T + b`` (+ ``residual``): forward and ``dx`` through oneDNN, ``dW = dy^T x`` and ``db`` through
    torch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if residual is None:
            return onednn_product(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.size(-1))
        grad_x = onednn_product(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_weight = grad_rows.t().mm(x.reshape(-1, x.size(-1))) if ctx.needs_input_grad[1] else None
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_residual = grad if ctx.needs_input_grad[3] else None
        return grad_x, grad_weight, grad_bias, grad_residual


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias) + residual`` (no residual when ``None``); ``x (..., D_in)``, ``weight
    (D_out, D_in)``, ``residual`` shaped as the output. Differentiable in every argument."""
    if _takes_kernel(x, weight) and (residual is None or (residual.dtype == torch.float32 and residual.shape
                                                          == (*x.shape[:-1], weight.size(0)))):
        return _Linear.apply(x, weight, bias, residual)
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def linear_activation(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """``activation(F.linear(x, weight, bias))`` for ``activation`` ``"none"``, ``"relu"`` or ``"sigmoid"``: one
    fused oneDNN product where nothing needs its gradient (eval-mode towers, the key towers), else as written."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"linear_activation supports {tuple(_ACTIVATIONS)}, got '{activation}'")
    if _takes_kernel(x, weight) and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return onednn_product(x, weight, bias, activation)
    return _ACTIVATIONS[activation](F.linear(x, weight, bias))


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state) whose product is ``linear``'s."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
