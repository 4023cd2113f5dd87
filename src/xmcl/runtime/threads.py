"""How many CPU threads torch's operators use, chosen so that a run on shared cores slows in proportion to its share.

torch's intra-op pool splits each operator over its threads and waits for the slowest at the operator's end. When
another process holds one of the cores, a thread of the pool waits for that core at every operator, and a step
costs several times what one thread alone would (measured in ``docs/results.md``, "threads"). ``ThreadBudget``
therefore counts the cores this process may run on (``os.sched_getaffinity``) minus the cores other processes keep
busy (tasks in the running state, read from ``/proc``), at the start and again every ``recheck_s`` seconds.
Helpers place work the intra-op pool does not: ``run_in_parts`` splits numpy work (which releases the GIL) over as
many threads, ``one_thread`` keeps a run of tiny operators on one, ``alongside`` runs two independent parts of a step
side by side, each on its share of the threads (a part of many operators and memory-bound passes keeps two threads
busier that way than splitting each operator over both), and ``fetched_ahead`` reads the next batch on a side
thread while the caller trains on the current one.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from xmcl.runtime.device import usable_cores

PROC = Path("/proc")
_pools: dict[int, ThreadPoolExecutor] = {}
_side_threads: dict[int, ThreadPoolExecutor] = {}
_side_lock = threading.Lock()
T = TypeVar("T")
_END = object()


def _running_elsewhere(own_pid: int) -> int:
    """Tasks (threads) of other processes in the running state now (``R`` in ``/proc/PID/task/TID/stat``)."""
    running = 0
    for pid_dir in PROC.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == own_pid:
            continue
        try:
            for stat in (pid_dir / "task").glob("*/stat"):
                fields = stat.read_text().rpartition(")")[2].split()  # the name may hold spaces and parentheses
                running += bool(fields) and fields[0] == "R"
        except OSError:  # the process ended while it was read
            continue
    return running


def busy_cores_elsewhere(samples: int = 5, interval_s: float = 0.01) -> int:
    """How many cores other processes keep busy: the median count of their running tasks over ``samples`` reads
    ``interval_s`` apart (0 where ``/proc`` cannot be read)."""
    if not PROC.is_dir():
        return 0
    counts = []
    for sample in range(samples):
        if sample:
            time.sleep(interval_s)
        counts.append(_running_elsewhere(os.getpid()))
    return int(statistics.median(counts))


class ThreadBudget:
    """torch's intra-op threads for a run (``run.threads``): ``requested`` > 0 is used as given; 0 is automatic:
    ``max(1, usable_cores() - busy_cores_elsewhere())``, chosen now and re-chosen by ``update`` (called at every
    step; it reads ``/proc`` at most every ``recheck_s`` seconds)."""

    def __init__(self, requested: int, recheck_s: float = 30.0) -> None:
        self.requested, self.recheck_s = requested, recheck_s
        self.threads = 0
        self._checked = -float("inf")
        self.update()

    def update(self) -> int:
        """Apply the budget (re-checking the load when due); returns the threads in use."""
        now = time.monotonic()
        if self.requested:
            wanted = self.requested
        elif now - self._checked >= self.recheck_s:
            self._checked = now
            wanted = max(1, usable_cores() - busy_cores_elsewhere())
        else:
            return self.threads
        if wanted != self.threads:
            torch.set_num_threads(wanted)
            self.threads = wanted
        return self.threads


def _pool(workers: int) -> ThreadPoolExecutor:
    """The ``workers`` threads ``run_in_parts`` splits work over (made once per count)."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xmcl-part")
    return _pools[workers]


def run_in_parts(work: Callable[[slice], None], count: int, min_part: int) -> None:
    """``work(part)`` for consecutive slices ``part`` covering ``range(count)``: one per torch intra-op thread, each of
    at least ``min_part`` items (one slice, on this thread, where there is too little), side by side on a shared pool.
    For numpy work, which releases the GIL in its loops (sorts, ufuncs, bit generators) where torch's pool cannot
    run it."""
    parts = max(1, min(torch.get_num_threads(), count // max(min_part, 1)))
    bounds = [count * i // parts for i in range(parts + 1)]
    spans = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    if parts == 1:
        work(spans[0])
    else:
        list(_pool(parts).map(work, spans))


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads of this thread set to ``count`` inside, restored after."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_thread() -> AbstractContextManager[None]:
    """``intra_op_threads(1)``: for a run of tiny operators (a recurrence's steps), where a product split over threads
    costs about twice its time on one, and more where another process holds a core the split must wait for."""
    return intra_op_threads(1)


def _side_thread(threads: int) -> ThreadPoolExecutor:
    """A worker thread whose torch operators split over ``threads`` intra-op threads, made once per count.
    torch keeps a count per thread (OpenMP's, set by ``set_num_threads`` in that thread and read once more at its
    first parallel operator from the process-wide one), so the worker sets and reads its count while the caller
    waits, and the caller's own count is restored after."""
    with _side_lock:
        if threads not in _side_threads:
            previous = torch.get_num_threads()
            worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"xmcl-side{threads}")

            def settle() -> int:
                torch.set_num_threads(threads)
                return torch.get_num_threads()

            worker.submit(settle).result()
            torch.set_num_threads(previous)
            _side_threads[threads] = worker
    return _side_threads[threads]


@contextmanager
def alongside(work: Callable[[], T], enabled: bool = True) -> Iterator[Callable[[], T]]:
    """Run ``work`` side by side with the caller's block; yields ``result()``, which returns ``work``'s result (or
    raises its exception). With ``n >= 2`` intra-op threads and ``enabled``, ``work`` runs at once on a side thread
    with ``n // 2`` of them while the block runs on the other ``n - n // 2``; leaving the block waits for ``work``, so
    nothing it reads changes under it. Otherwise ``work`` runs on this thread at the first ``result()`` (called after
    the block, the order of serial code). ``work`` must not draw from a random generator the block draws from."""
    threads = torch.get_num_threads()
    if not enabled or threads < 2:
        yield functools.cache(work)  # runs here, once, at the first call
        return
    pending = _side_thread(threads // 2).submit(work)
    try:
        with intra_op_threads(threads - threads // 2):
            yield pending.result
    finally:
        wait([pending])


def fetched_ahead(items: Iterable[T], enabled: bool = True) -> Iterator[T]:
    """The items of ``items`` in their order, each next one read on a side thread of one intra-op thread while the
    caller works on the current one (with 2 threads, the one ``alongside`` also uses: a read queues beside its work).
    Plain iteration where not ``enabled`` or with one thread. Closing the iterator early waits for a read in flight.
    ``items`` must draw from no random generator the caller draws from."""
    if not enabled or torch.get_num_threads() < 2:
        yield from items
        return
    worker, iterator = _side_thread(1), iter(items)
    pending = worker.submit(next, iterator, _END)
    try:
        while (item := pending.result()) is not _END:
            pending = worker.submit(next, iterator, _END)
            yield item
    finally:
        wait([pending])
