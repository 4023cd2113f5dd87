"""Request counts and latency quantiles of the search service, in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

QUANTILES = (0.5, 0.9, 0.95, 0.99)
WINDOW = 4096  # latency quantiles are over the last WINDOW searches of each index


class ServiceMetrics:
    """Counts searches by (index, status) and keeps each index's recent latencies; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    def observe(self, index: str, status: int, seconds: float) -> None:
        """One search request on ``index`` answered with ``status`` after ``seconds`` (latency only for 200)."""
        with self._lock:
            self._requests[(index, status)] += 1
            if status == 200:
                self._latency.setdefault(index, deque(maxlen=WINDOW)).append(seconds)
                self._sums[index] += seconds
                self._counts[index] += 1

    def render(self, gauges: dict[tuple[str, str], int]) -> str:
        """The exposition text; ``gauges``: ``(index, target) -> items`` indexed."""
        with self._lock:
            requests = sorted(self._requests.items())
            latency = {name: np.array(values) for name, values in self._latency.items()}
            sums, counts = dict(self._sums), dict(self._counts)
        lines = ["# HELP xmcl_search_requests_total Search requests by index and HTTP status.",
                 "# TYPE xmcl_search_requests_total counter"]
        lines += [f'xmcl_search_requests_total{{index="{i}",status="{s}"}} {n}' for (i, s), n in requests]
        lines += ["# HELP xmcl_search_latency_seconds Search latency in the server (parse, encode, search, metadata) "
                  f"over the last {WINDOW} searches.",
                  "# TYPE xmcl_search_latency_seconds summary"]
        for name in sorted(latency):
            for q in QUANTILES:
                lines.append(f'xmcl_search_latency_seconds{{index="{name}",quantile="{q}"}} '
                             f"{float(np.quantile(latency[name], q)):.6f}")
            lines.append(f'xmcl_search_latency_seconds_sum{{index="{name}"}} {sums[name]:.6f}')
            lines.append(f'xmcl_search_latency_seconds_count{{index="{name}"}} {counts[name]}')
        lines += ["# HELP xmcl_index_items Vectors in each served index.", "# TYPE xmcl_index_items gauge"]
        lines += [f'xmcl_index_items{{index="{i}",target="{t}"}} {n}' for (i, t), n in sorted(gauges.items())]
        return "\n".join(lines) + "\n"
