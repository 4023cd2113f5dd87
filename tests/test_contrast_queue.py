"""Momentum queue (ring buffer with ids) and momentum encoder update, against a slot-by-slot simulation."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from xmcl.contrast import MomentumQueue, make_key_encoder, momentum_update
from xmcl.errors import ConfigError, DataError


def simulate(size: int, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Write rows one at a time into a Python ring: slot = count % size."""
    keys, ids, count = [None] * size, [-1] * size, 0
    for batch_keys, batch_ids in batches:
        for row, idx in zip(batch_keys.tolist(), batch_ids.tolist()):
            keys[count % size], ids[count % size] = row, idx
            count += 1
    return keys, ids, count


def assert_matches(queue: MomentumQueue, size: int, batches) -> None:
    keys, ids, count = simulate(size, batches)
    filled = min(count, size)
    assert queue.ids.tolist() == ids
    assert int(queue.ptr) == count % size and int(queue.filled) == filled
    assert queue.valid_mask().tolist() == [slot < filled for slot in range(size)]
    for slot in range(size):
        expected = keys[slot] if keys[slot] is not None else [0.0] * queue.keys.shape[1]
        assert queue.keys[slot].tolist() == pytest.approx(expected)


def batch(n: int, start: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids[:, None].float() + torch.arange(dim).float() / 10, ids


def test_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    queue, written = MomentumQueue(size=5, dim=3), []
    for step in range(4):  # 3, 6, 9, 12 rows written into 5 slots
        written.append(batch(3, 100 * step))
        queue.enqueue(*written[-1])
        assert_matches(queue, 5, written)
    assert queue.ids.tolist() == [301, 302, 201, 202, 300]  # rows 10, 11, 7, 8, 9 of 0..11


def test_batch_larger_than_queue_keeps_its_last_rows():
    queue, written = MomentumQueue(size=4, dim=3), [batch(1, 0)]
    queue.enqueue(*written[0])
    written.append(batch(6, 10))
    queue.enqueue(*written[1])
    assert_matches(queue, 4, written)
    assert sorted(queue.ids.tolist()) == [12, 13, 14, 15]


def test_random_batch_sizes_follow_the_simulation():
    g = torch.Generator().manual_seed(0)
    queue, written = MomentumQueue(size=7, dim=2), []
    for step in range(12):
        n = int(torch.randint(0, 10, (1,), generator=g))
        written.append((torch.randn(n, 2, generator=g), torch.randint(0, 50, (n,), generator=g)))
        queue.enqueue(*written[-1])
        assert_matches(queue, 7, written)


def test_empty_queue_has_no_valid_slot_and_marks_ids():
    queue = MomentumQueue(size=3, dim=2)
    assert queue.valid_mask().tolist() == [False, False, False]
    assert queue.ids.tolist() == [-1, -1, -1]


def test_state_dict_round_trip_restores_pointer_and_contents():
    queue = MomentumQueue(size=5, dim=3)
    for step in range(3):
        queue.enqueue(*batch(2, 10 * step))
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = MomentumQueue(size=5, dim=3)
    restored.load_state_dict(torch.load(buffer))
    for name in ("keys", "ids", "ptr", "filled"):
        assert torch.equal(getattr(restored, name), getattr(queue, name))
    nxt = batch(3, 99)
    queue.enqueue(*nxt)
    restored.enqueue(*nxt)
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ids, queue.ids)
    assert set(queue.state_dict()) == {"keys", "ids", "ptr", "filled"}


def test_enqueued_keys_are_detached():
    queue = MomentumQueue(size=4, dim=2)
    keys = torch.ones(2, 2, requires_grad=True) * 2
    queue.enqueue(keys, torch.tensor([0, 1]))
    assert not queue.keys.requires_grad
    assert queue.keys[:2].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_bad_queue_input_is_named():
    queue = MomentumQueue(size=4, dim=2)
    with pytest.raises(DataError, match=r"\(n x 2\)"):
        queue.enqueue(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(DataError, match=">= 0"):
        queue.enqueue(torch.zeros(2, 2), torch.tensor([0, -1]))
    with pytest.raises(DataError, match="integers"):
        queue.enqueue(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match="size"):
        MomentumQueue(size=0, dim=2)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


def test_momentum_update_against_hand_computation():
    torch.manual_seed(0)
    online = Tiny()
    key = make_key_encoder(online)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with torch.no_grad():
        online.linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        online.linear.bias.copy_(torch.tensor([0.5, -0.5]))
        key.linear.weight.copy_(torch.tensor([[0.0, 10.0], [-2.0, 1.0]]))
        key.linear.bias.copy_(torch.tensor([1.0, 1.0]))
    online(torch.randn(8, 2))  # train-mode forward changes the online BatchNorm running statistics
    momentum_update(online, key, m=0.9)
    # 0.9 * key + 0.1 * online, element by element
    assert key.linear.weight.flatten().tolist() == pytest.approx([0.1, 9.2, -1.5, 1.3])
    assert key.linear.bias.tolist() == pytest.approx([0.95, 0.85])
    assert key.norm.weight.tolist() == pytest.approx([1.0, 1.0]) and key.norm.bias.tolist() == pytest.approx([0, 0])
    assert torch.equal(key.norm.running_mean, online.norm.running_mean)
    assert torch.equal(key.norm.running_var, online.norm.running_var)
    assert int(key.norm.num_batches_tracked) == 1
    assert online.linear.weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # the online encoder is untouched


def test_momentum_extremes_and_mismatch():
    online = Tiny()
    key = make_key_encoder(online)
    with torch.no_grad():
        online.linear.weight.add_(1.0)
    before = key.linear.weight.clone()
    momentum_update(online, key, m=1.0)
    assert torch.equal(key.linear.weight, before)
    momentum_update(online, key, m=0.0)
    assert torch.equal(key.linear.weight, online.linear.weight)
    with pytest.raises(ConfigError, match="momentum m"):
        momentum_update(online, key, m=1.5)
    with pytest.raises(ConfigError, match="does not mirror"):
        momentum_update(online, nn.Linear(2, 2), m=0.5)
