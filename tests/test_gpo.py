"""Pooling (GPO, masked mean/max), the length mask and the BiGRU, against direct computations."""

import math

import pytest
import torch

from xmcl.errors import ConfigError, DataError
from xmcl.nn.gpo import (
    GPO,
    MaxPooling,
    MeanPooling,
    build_pooling,
    positional_encoding,
    sorted_columns,
)
from xmcl.nn.sequence import BiGRU, length_mask

LENGTHS = [5, 2, 7, 1]


def padded_batch(lengths, dim=6, pad_to=None, pad_value=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pad_to = pad_to or max(lengths)
    x = torch.randn(len(lengths), pad_to, dim, generator=gen)
    if pad_value is not None:
        for b, n in enumerate(lengths):
            x[b, n:] = pad_value
    return x, torch.tensor(lengths)


def test_length_mask_and_its_checks():
    mask = length_mask(torch.tensor([2, 3]), 4)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    with pytest.raises(DataError, match="min 0"):
        length_mask(torch.tensor([0, 3]), 4)
    with pytest.raises(DataError, match="max 5"):
        length_mask(torch.tensor([2, 5]), 4)


def test_positional_encoding_matches_the_formula():
    pe = positional_encoding(6, 8)
    for p in range(6):
        for k in range(4):
            angle = p / 10000 ** (2 * k / 8)
            assert pe[p, 2 * k].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    with pytest.raises(ConfigError):
        positional_encoding(3, 5)


def test_masked_mean_and_max_against_loops():
    x, lengths = padded_batch(LENGTHS, pad_value=1e4)
    mean, top = MeanPooling()(x, lengths), MaxPooling()(x, lengths)
    for b, n in enumerate(LENGTHS):
        for d in range(x.shape[2]):
            values = [x[b, i, d].item() for i in range(n)]
            assert mean[b, d].item() == pytest.approx(sum(values) / n, abs=1e-5)
            assert top[b, d].item() == pytest.approx(max(values), abs=1e-6)


def test_bigru_matches_an_unpadded_run_per_sequence():
    torch.manual_seed(0)
    gru = BiGRU(4, 3)
    x, lengths = padded_batch([3, 5], dim=4, pad_value=7.0)
    out = gru(x, lengths)
    for b, n in enumerate([3, 5]):
        alone, _ = gru.gru(x[b : b + 1, :n])  # a plain run on the unpadded sequence
        expected = (alone[..., :3] + alone[..., 3:]) / 2
        torch.testing.assert_close(out[b, :n], expected[0], atol=1e-6, rtol=1e-5)
        assert torch.all(out[b, n:] == 0)


def test_gpo_weights_sum_to_one_over_valid_positions_and_follow_the_scorer():
    torch.manual_seed(1)
    gpo = GPO()
    weights = gpo.pool_weights(torch.tensor(LENGTHS), 9)
    for b, n in enumerate(LENGTHS):
        assert weights[b, :n].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.all(weights[b, n:] == 0)
        states, _ = gpo.gru.gru(positional_encoding(n, 32).unsqueeze(0))
        scores = gpo.scorer((states[..., :32] + states[..., 32:]) / 2).squeeze(-1)[0]
        expected = [math.exp(s / 0.1) for s in scores.tolist()]
        total = sum(expected)
        for k in range(n):
            assert weights[b, k].item() == pytest.approx(expected[k] / total, rel=1e-4, abs=1e-7)


def test_gpo_is_a_weighted_sum_of_per_dimension_sorted_features():
    torch.manual_seed(2)
    gpo = GPO()
    x, lengths = padded_batch(LENGTHS, pad_value=1e4)
    pooled = gpo(x, lengths)
    weights = gpo.pool_weights(lengths, x.shape[1])
    for b, n in enumerate(LENGTHS):
        for d in range(x.shape[2]):
            ranked = sorted((x[b, i, d].item() for i in range(n)), reverse=True)
            expected = sum(weights[b, k].item() * ranked[k] for k in range(n))
            assert pooled[b, d].item() == pytest.approx(expected, abs=1e-5)


def _sorted_by_torch(features, lengths):
    """``sorted_columns``' values by ``torch.sort`` of each valid column, 0 beyond it."""
    columns = features.transpose(1, 2)
    expected = torch.zeros_like(columns)
    for b, n in enumerate(lengths.tolist()):
        expected[b, :, :n] = columns[b, :, :n].sort(dim=1, descending=True).values
    return expected


@pytest.mark.parametrize("with_index", [True, False])
def test_sorted_columns_of_every_magnitude_over_threads(monkeypatch, with_index):
    """Signed zeros, subnormals, huge values, infinities, ties and pads (of any value, NaN included), the batch split
    over two threads: the values equal torch's sort of each valid column, and the flat positions are a permutation of
    each set's positions that reads those values back (the pads' positions at the pads' ranks)."""
    from xmcl.nn import gpo
    from xmcl.runtime import threads

    batch, steps, dims = 2 * gpo._SPLIT_ELEMENTS // (49 * 3) + 1, 49, 3  # enough values for two parts
    pools = []
    real_pool = threads._pool
    monkeypatch.setattr(threads, "_pool", lambda workers: pools.append(workers) or real_pool(workers))
    gen = torch.Generator().manual_seed(11)
    scale = torch.logspace(-44, 38, steps)[torch.randperm(steps, generator=gen)]
    x = torch.randn(batch, steps, dims, generator=gen) * scale[:, None]
    x[::3, :7, 0] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, float("inf"), float("-inf")])
    x[1::3, 10:20] = 2.5  # ties
    lengths = torch.full((batch,), steps)
    lengths[2::3] = 40
    x[2::3, 40:] = torch.tensor([float("nan"), float("inf"), 7.0])  # pads, never read
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        values, index = sorted_columns(x, lengths, with_index=with_index)
    finally:
        torch.set_num_threads(previous)
    assert pools == [2]
    assert torch.equal(values, _sorted_by_torch(x, lengths))
    if not with_index:
        assert index is None
        return
    flat = x.reshape(batch, -1)
    assert torch.equal(index.reshape(batch, -1).sort(dim=1).values, torch.arange(steps * dims).expand(batch, -1))
    read_back = flat.gather(1, index.reshape(batch, -1)).view_as(values)
    valid = torch.arange(steps) < lengths[:, None, None]
    assert torch.equal(read_back[valid.expand_as(values)], values[valid.expand_as(values)])
    assert torch.equal(index % dims, torch.arange(dims).view(1, dims, 1).expand_as(index))  # each stays in its column


def test_gpo_on_the_cpu_path_equals_the_torch_path(monkeypatch):
    """The float32 CPU pooling (numpy's sort, the hand-written backward) against torch's sort and gather (the path
    every other device and dtype takes), output and gradients of the features and of the GPO's parameters."""
    from xmcl.nn import gpo as gpo_module

    torch.manual_seed(13)
    pool = GPO()
    x, lengths = padded_batch(LENGTHS + [7, 3], dim=5, pad_to=7, seed=14)
    coefficients = torch.randn(len(LENGTHS) + 2, 5)

    def run():
        features = x.clone().requires_grad_(True)
        pool.zero_grad()
        out = pool(features, lengths)
        (out * coefficients).sum().backward()
        return out.detach(), features.grad, [p.grad.clone() for p in pool.parameters()]

    fast = run()
    monkeypatch.setattr(gpo_module, "_LOW_BITS", 0)  # no set fits: every call takes the torch path
    slow = run()
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=0)
    for fast_grad, slow_grad in zip(fast[2], slow[2]):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lengths", [LENGTHS, [7, 7, 7, 7]])
def test_gpo_without_gradients_pools_as_with_them(lengths):
    """The no-grad path (sorted values alone) against the gather of the permutation."""
    torch.manual_seed(8)
    gpo = GPO()
    x, lengths_t = padded_batch(lengths, pad_to=7, seed=9)
    with_grad = gpo(x.clone().requires_grad_(True), lengths_t)
    with torch.no_grad():
        without = gpo(x, lengths_t)
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [LENGTHS, [7, 7, 7, 7]])
def test_gpo_gradient_is_each_values_rank_weight(lengths):
    """d/dx_bid of sum_d c_d * GPO(x)_bd is c_d * theta_b[rank of x_bid among the valid x_b.d], 0 on pads."""
    torch.manual_seed(6)
    gpo = GPO()
    x, lengths_t = padded_batch(lengths, pad_to=7, seed=7)
    x.requires_grad_(True)
    coefficients = torch.randn(x.shape[2])
    (gpo(x, lengths_t) * coefficients).sum().backward()
    weights = gpo.pool_weights(lengths_t, 7).detach()
    for b, n in enumerate(lengths):
        for d in range(x.shape[2]):
            column = [x[b, i, d].item() for i in range(n)]
            for i in range(7):
                expected = 0.0
                if i < n:
                    rank = sum(value > column[i] for value in column)
                    expected = coefficients[d].item() * weights[b, rank].item()
                assert x.grad[b, i, d].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["gpo", "mean", "max"])
def test_pooling_is_invariant_to_padding_length_and_pad_values(name):
    torch.manual_seed(3)
    pool = build_pooling(name)
    short, lengths = padded_batch(LENGTHS, seed=4)
    long = torch.full((len(LENGTHS), 12, short.shape[2]), 1e6)
    long[:, : short.shape[1]] = short
    for b, n in enumerate(LENGTHS):
        long[b, n:] = -1e6 if b % 2 else 1e6
    torch.testing.assert_close(pool(short, lengths), pool(long, lengths))
    for b, n in enumerate(LENGTHS):  # and equal to pooling each set alone, unpadded
        torch.testing.assert_close(pool(short[b : b + 1, :n], torch.tensor([n]))[0], pool(short, lengths)[b])


def test_padded_positions_receive_no_gradient():
    torch.manual_seed(5)
    x, lengths = padded_batch(LENGTHS)
    x.requires_grad_(True)
    GPO()(x, lengths).square().sum().backward()
    for b, n in enumerate(LENGTHS):
        assert torch.all(x.grad[b, n:] == 0)
        assert x.grad[b, :n].abs().sum() > 0


def test_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="'avg'"):
        build_pooling("avg")


def test_gpo_weights_and_their_gradients_equal_one_recurrence_per_row_when_lengths_repeat():
    torch.manual_seed(5)
    gpo = GPO()
    lengths = torch.tensor([4, 7, 4, 4, 7, 2])
    weights = gpo.pool_weights(lengths, 7)
    (weights * torch.arange(42.0).view(6, 7)).sum().backward()
    fast = [p.grad.clone() for p in gpo.parameters()]
    gpo.zero_grad()
    pe = positional_encoding(7, 32).expand(6, 7, 32)  # every row through the BiGRU, as one batch of six
    scores = gpo.scorer(gpo.gru(pe, lengths)).squeeze(-1).masked_fill(
        torch.arange(7)[None, :] >= lengths[:, None], float("-inf"))
    reference = torch.softmax(scores / 0.1, dim=1)
    (reference * torch.arange(42.0).view(6, 7)).sum().backward()
    torch.testing.assert_close(weights, reference, atol=1e-6, rtol=1e-5)
    for got, expected in zip(fast, (p.grad for p in gpo.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
