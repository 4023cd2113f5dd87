"""Wall-clock timing shared by the benchmark scripts (imported as ``timing``: scripts run from ``benchmarks/``)."""

from __future__ import annotations

import time
from typing import Callable


def repeat_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def interleaved_seconds(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of ``repeats`` calls of each of ``fns``, taken in turn (one call of each per round, after one untimed
    warm-up round), so that a drift of the machine's speed falls on all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            began = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - began)
    return times


def gflop(fn: Callable[[], object]) -> float:
    """GFLOP of one call of ``fn`` (matrix products and convolutions, forward and backward, as
    ``torch.utils.flop_counter`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9
