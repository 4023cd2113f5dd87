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
