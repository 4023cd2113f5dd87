"""xmcl.nn.Dropout against the definition of inverted dropout and against nn.Dropout's statistics."""

import pytest
import torch

from xmcl.errors import ConfigError
from xmcl.nn.dropout import Dropout


def test_training_output_is_zero_or_the_input_over_keep_and_the_gradient_is_the_same_mask():
    torch.manual_seed(0)
    layer = Dropout(0.4).train()
    x = (torch.rand(300, 50) + 0.5).requires_grad_(True)  # no zero entries: a zero output means a dropped one
    y = layer(x)
    dropped = y == 0
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] / 0.6)
    y.sum().backward()
    assert torch.all(x.grad[dropped] == 0)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.6))


def test_drop_rate_and_mean_match_nn_dropout_within_sampling_error():
    torch.manual_seed(1)
    x = torch.ones(1000, 1000)
    ours, reference = Dropout(0.4).train()(x), torch.nn.Dropout(0.4).train()(x)
    n = x.numel()
    tolerance = 5 * (0.4 * 0.6 / n) ** 0.5  # five standard errors of a drop rate of 0.4 over n draws
    assert float((ours == 0).float().mean()) == pytest.approx(0.4, abs=tolerance)
    assert float((reference == 0).float().mean()) == pytest.approx(0.4, abs=tolerance)
    assert float(ours.mean()) == pytest.approx(1.0, abs=5 * (0.4 / 0.6 / n) ** 0.5)


def test_masks_follow_the_global_seed_and_eval_is_the_identity():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    first = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    again = Dropout(0.3).train()(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, Dropout(0.3).train()(x))
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_the_probability_is_checked():
    with pytest.raises(ConfigError, match="1.0"):
        Dropout(1.0)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.9])
def test_the_cpu_mask_keeps_each_lane_at_the_rate_asked(p: float) -> None:
    """Every one of the four 16-bit lanes of a 64-bit draw keeps at 1 - p (five standard errors), so no lane is
    biased by how the words are cut."""
    from xmcl.nn.dropout import cpu_keep_mask

    torch.manual_seed(4)
    mask = cpu_keep_mask(torch.Size([4 * 250_000]), p)
    tolerance = 5 * (p * (1 - p) / 250_000) ** 0.5
    for lane in range(4):
        assert float(mask[lane::4].float().mean()) == pytest.approx(1 - p, abs=tolerance), lane
    assert cpu_keep_mask(torch.Size([3, 5]), p).shape == (3, 5)  # a count that is not a multiple of 4


def test_the_cpu_output_is_the_input_times_its_scaled_mask() -> None:
    """The CPU output is ``x`` times the mask of ``cpu_keep_mask`` drawn from the global generator, scaled."""
    from xmcl.nn.dropout import cpu_keep_mask

    x = torch.randn(128, 49, 32)
    torch.manual_seed(6)
    mask = cpu_keep_mask(x.shape, 0.4)
    torch.manual_seed(6)
    torch.manual_seed(6)
    scaled = cpu_keep_mask(x.shape, 0.4, keep_value=1.0 / 0.6)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, mask.to(torch.float32) * (1.0 / 0.6))
    torch.manual_seed(6)
    assert torch.equal(Dropout(0.4).train()(x), x * scaled)


def test_the_cpu_mask_does_not_depend_on_the_threads_that_draw_it(monkeypatch) -> None:
    """Chunks drawn over two threads and over one give the same mask, for a count that ends inside a chunk; the
    chunks are not copies of each other."""
    from xmcl.nn import dropout
    from xmcl.runtime import threads

    parts = []
    real_pool = threads._pool
    monkeypatch.setattr(threads, "_pool", lambda workers: parts.append(workers) or real_pool(workers))
    shape = torch.Size([3, dropout._CHUNK + 1001])
    previous = torch.get_num_threads()
    try:
        masks = []
        for count in (2, 1):
            torch.set_num_threads(count)
            torch.manual_seed(7)
            masks.append(dropout.cpu_keep_mask(shape, 0.3))
    finally:
        torch.set_num_threads(previous)
    assert parts == [2]
    assert torch.equal(masks[0], masks[1])
    flat = masks[0].flatten()
    assert not torch.equal(flat[: dropout._CHUNK], flat[dropout._CHUNK: 2 * dropout._CHUNK])
