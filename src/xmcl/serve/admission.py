"""Admission of heavy requests: at most ``workers`` run at once, in worker threads, and at most ``queue`` wait.

Decoding an upload, tokenising, encoding and searching run off the event loop (so ``/healthz`` and the page stay
responsive while a 49-megapixel PNG decodes), and the bound keeps memory bounded under a burst: a request that finds
``workers + queue`` already admitted is answered 503 at once instead of piling up.
"""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class ServerBusy(Exception):
    """Every worker is busy and the queue is full."""


class Admission:
    """``await admission.run(fn, *args)``: ``fn`` in a worker thread once one of ``workers`` slots is free."""

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"admission needs workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self.admitted = 0
        self._slots: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self.admitted >= self.workers + self.queue:
            raise ServerBusy(f"the server is busy ({self.workers} queries running, {self.queue} waiting); retry")
        if self._slots is None:  # made on the event loop that uses it
            self._slots = asyncio.Semaphore(self.workers)
        self.admitted += 1
        try:
            async with self._slots:
                return await run_in_threadpool(fn, *args, **kwargs)
        finally:
            self.admitted -= 1
