"""The warm-up + cosine schedule against the closed forms the two loops were written with."""

from __future__ import annotations

import math

import pytest
import torch

from xmcl.training.schedule import warmup_cosine


def _rates(warmup: int, total: int, decay_from: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine(optimizer, warmup, total, decay_from)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup,total", [(3, 20), (1, 5)])
def test_decay_from_the_start_is_min_of_ramp_and_cosine(warmup: int, total: int) -> None:
    expected = [2.0 * min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
                for s in range(total + 3)]
    assert _rates(warmup, total, 0, total + 3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("warmup,total", [(4, 20), (0, 7)])
def test_decay_after_the_warmup_ramps_then_decays_over_the_rest(warmup: int, total: int) -> None:
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min((s - warmup) / max(1, total - warmup), 1.0)))

    expected = [2.0 * factor(s) for s in range(total + 3)]
    assert _rates(warmup, total, warmup, total + 3) == pytest.approx(expected, abs=1e-12)
    assert expected[total] == 0.0
