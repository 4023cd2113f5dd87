"""fast_tanh against torch.tanh: values, saturation and gradients."""

from __future__ import annotations

import torch

from xmcl.nn.activations import FastTanh, fast_tanh


def test_values_and_saturation_equal_torch_tanh() -> None:
    x = torch.cat([torch.linspace(-30, 30, 100_001), torch.tensor([0.0, -0.0, 1e-8, -1e-8, 1e4, -1e4])])
    torch.testing.assert_close(fast_tanh(x), torch.tanh(x), rtol=0, atol=2e-7)
    assert fast_tanh(torch.tensor([1e4, -1e4])).tolist() == [1.0, -1.0]


def test_the_gradient_is_one_minus_the_square_and_passes_gradcheck() -> None:
    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_tanh, (x,))
    y = torch.randn(50, 7) * 3
    mine, theirs = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    FastTanh()(mine).sum().backward()
    torch.tanh(theirs).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-6)
