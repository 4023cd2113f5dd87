"""Wall-clock timing, compute rates, memory and a free local port, shared by the benchmark scripts (imported as
``timing``: scripts run from ``benchmarks/``)."""

from __future__ import annotations

import math
import socket
import time
from typing import Callable

import numpy as np
import torch

from xmcl.nn import dense
from xmcl.runtime.device import peak_memory_mib
from xmcl.runtime.threads import one_thread


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


def _accumulated_product_flop(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOP of ``self.addmm_(mat1, mat2)``: ``2 m k n``, as the counter's own ``addmm``."""
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def _onednn_linear_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOP of ``mkldnn::_linear_pointwise`` (``xmcl.nn.dense``), the product's alone in either overload (the
    fused residual or activation not counted): ``2 k`` per output element, ``k`` the input's last dimension."""
    return 2 * math.prod(out_shape) * x_shape[-1]


def gflop(fn: Callable[[], object]) -> float:
    """GFLOP of one call of ``fn`` (matrix products and convolutions, forward and backward, as
    ``torch.utils.flop_counter`` counts them; the in-place ``addmm_`` and oneDNN's products (``xmcl.nn.dense``),
    which it does not list, as ``addmm``). ``fn`` runs on one thread: a dispatch mode sees its own thread's operators
    only, and on more threads a USER step runs its key towers on a side thread (``runtime.threads.alongside``)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.addmm_: _accumulated_product_flop}
    if dense.KERNEL_AVAILABLE:
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flop
    with one_thread(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``^3 float32 matrix product on the current torch threads: the best of ``repeats`` runs of
    each library torch carries (MKL's, behind ``a @ b``, and oneDNN's, which ``xmcl.nn.dense`` uses)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = [lambda: a @ b]
    if dense.KERNEL_AVAILABLE:
        b_rows = b.t().contiguous()  # oneDNN's form: x @ w^T
        products.append(lambda: dense.onednn_product(a, b_rows, None))
    return 2 * size ** 3 / min(min(repeat_seconds(product, repeats)) for product in products) / 1e9


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``seconds`` (0 for none), in milliseconds."""
    ms = np.array(seconds or [0.0]) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB (``runtime.device.peak_memory_mib`` on the CPU)."""
    return peak_memory_mib(torch.device("cpu"))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
