"""nn.dense: oneDNN's products against the same affine maps computed in float64 by torch, with their gradients."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xmcl.nn import dense

pytestmark = pytest.mark.skipif(not dense.KERNEL_AVAILABLE, reason="this torch has no oneDNN linear kernel")


def float64_reference(x, weight, bias, residual, grad):
    """Output and gradients of ``x W^T + b + residual`` in float64 autograd."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    x64, w64, b64, r64 = leaves
    out = F.linear(x64, w64, b64)
    if r64 is not None:
        out = out + r64
    out.backward(grad.double())
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("shape", [(37, 24), (3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_linear_matches_float64(shape, with_bias, with_residual):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    weight = torch.randn(16, 24, generator=gen, requires_grad=True)
    bias = torch.randn(16, generator=gen, requires_grad=True) if with_bias else None
    residual = torch.randn(*shape[:-1], 16, generator=gen, requires_grad=True) if with_residual else None
    grad = torch.randn(*shape[:-1], 16, generator=gen)
    out = dense.linear(x, weight, bias, residual)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_LinearBackward"  # the kernel path ran
    out.backward(grad)
    expected, grads = float64_reference(x, weight, bias, residual, grad)
    torch.testing.assert_close(out.detach().double(), expected, rtol=1e-5, atol=1e-5)
    for leaf, reference in zip((x, weight, bias, residual), grads):
        if leaf is not None:
            torch.testing.assert_close(leaf.grad.double(), reference, rtol=1e-5, atol=1e-4)


def test_linear_on_a_strided_input_and_only_the_weight_learning():
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 48, generator=gen)
    x = wide[:, ::2]  # (20, 24), not contiguous
    weight = torch.randn(8, 24, generator=gen, requires_grad=True)
    grad = torch.randn(20, 8, generator=gen)
    dense.linear(x, weight).backward(grad)
    torch.testing.assert_close(weight.grad.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-4)
    assert x.grad is None
    weight.grad = None
    dense.linear(x, weight).sum().backward()  # a gradient that is one value broadcast (stride 0)
    torch.testing.assert_close(weight.grad.double(), x.double().sum(0).expand(8, 24), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid"])
def test_linear_activation_fuses_the_activation(activation):
    gen = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(50, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    expected = x.double() @ weight.double().t() + bias.double()
    expected = {"none": expected, "relu": expected.relu(), "sigmoid": expected.sigmoid()}[activation]
    torch.testing.assert_close(dense.linear_activation(x, weight, bias, activation).double(), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tanh"):
        dense.linear_activation(x, weight, bias, "tanh")


def test_other_dtypes_and_autocast_take_torchs_product():
    x, weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: dense.linear(a, weight, residual=torch.ones(6, 3, dtype=a.dtype)),
                                    (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense.linear(torch.randn(6, 4), torch.randn(3, 4))
    assert out.dtype == torch.bfloat16  # F.linear under autocast, as an nn.Linear would give


def test_linear_module_keeps_nn_linears_state():
    torch.manual_seed(3)
    reference = torch.nn.Linear(10, 4)
    layer = dense.Linear(10, 4)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(9, 10)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_the_products_benchmark_times_the_same_product_in_each_library():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import dense_products

    torch.manual_seed(4)
    for form, (flop, impls) in dense_products.forms(40, 24, 16).items():
        mkl, onednn = impls["mkl"](), impls["onednn"]()
        assert flop == 2 * 40 * 24 * 16
        torch.testing.assert_close(onednn, mkl, rtol=1e-5, atol=1e-4, msg=form)
