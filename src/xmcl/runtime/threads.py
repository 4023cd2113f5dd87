"""How many CPU threads torch's operators use, chosen so that a run on shared cores slows in proportion to its share.

torch's intra-op pool splits each operator over its threads and waits for the slowest at the operator's end. When
another process holds one of the cores, a thread of the pool waits for that core at every operator, and a step
costs several times what one thread alone would (measured in ``docs/results.md``, "threads"). ``ThreadBudget``
therefore counts the cores this process may run on (``os.sched_getaffinity``) minus the cores other processes keep
busy (tasks in the running state, read from ``/proc``), at the start and again every ``recheck_s`` seconds.
Two helpers place work the intra-op pool does not: ``run_in_parts`` splits numpy work (which releases the GIL) over
as many threads, and ``one_thread`` keeps a run of tiny operators on one.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from xmcl.runtime.device import usable_cores

PROC = Path("/proc")
_pools: dict[int, ThreadPoolExecutor] = {}


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
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to one inside, restored after: for a run of tiny operators (a recurrence's steps),
    where a product split over threads costs about twice its time on one, and more where another process holds a
    core the split must wait for."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
