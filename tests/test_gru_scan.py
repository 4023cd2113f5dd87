"""The two-direction GRU scan against nn.GRU over packed sequences (``BiGRU``): states and every gradient."""

import pytest
import torch

from xmcl.nn.gru_scan import bidirectional_gru_mean
from xmcl.nn.sequence import BiGRU


@pytest.mark.parametrize("lengths", [[14, 3, 7, 1, 9], [6, 6], [1]])
def test_states_and_gradients_equal_the_packed_bigru(lengths):
    torch.manual_seed(0)
    bigru = BiGRU(12, 10).double()
    x = torch.randn(len(lengths), max(lengths), 12, dtype=torch.float64, requires_grad=True)
    lengths_t = torch.tensor(lengths)
    want = bigru(x, lengths_t)
    got = bidirectional_gru_mean(x, lengths_t, bigru.gru)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, dtype=torch.float64)
    inputs = [x, *bigru.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_float32_under_autocast_is_computed_in_float32():
    torch.manual_seed(1)
    bigru = BiGRU(8, 8)
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bidirectional_gru_mean(x, lengths, bigru.gru)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, bigru(x, lengths), rtol=1e-5, atol=1e-6)


def test_a_gru_it_cannot_compute_is_refused():
    with pytest.raises(ValueError, match="one-layer, bidirectional"):
        bidirectional_gru_mean(torch.zeros(1, 2, 3), torch.tensor([2]), torch.nn.GRU(3, 4, batch_first=True))
