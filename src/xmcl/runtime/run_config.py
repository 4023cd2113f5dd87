"""The ``run:`` section every config shares (seed, device, threads, progress, checkpoint and log cadence), and
``start_run``, which applies it at the start of a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmcl.config import FieldRangeError, require
from xmcl.runtime.device import resolve_device
from xmcl.runtime.rng import seed_everything


@dataclass
class RunConfig:
    """Run controls, the same for every system.

    ``seed`` seeds every random stream; ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...;
    ``threads``: CPU threads for torch (0 = torch's default; use 1 when other jobs share the cores);
    ``progress``: progress bars; ``checkpoint_every``: also write ``last.pt`` every N optimiser steps (0 = at
    epoch ends and at the end only); ``log_every``: one log line per N steps.
    """

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    checkpoint_every: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        require(self, "seed", ge=0)
        require(self, "threads", ge=0)
        require(self, "checkpoint_every", ge=0)
        require(self, "log_every", ge=1)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise FieldRangeError("device", self.device, "'auto' or a torch device (cpu, cuda, cuda:1, ...)") \
                    from None


def start_run(run: RunConfig) -> torch.device:
    """Apply ``run``: torch threads, every seed; returns the resolved device."""
    device = resolve_device(run.device)
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    return device
