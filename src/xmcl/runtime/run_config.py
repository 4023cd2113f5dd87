"""The ``run:`` section every config shares (seed, device, threads, progress, checkpoint and log cadence), and
``start_run``, which applies it at the start of a run."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Literal

import torch

from xmcl.config import FieldRangeError, require
from xmcl.errors import ConfigError
from xmcl.runtime.allocator import keep_freed_memory
from xmcl.runtime.device import resolve_device
from xmcl.runtime.rng import seed_everything
from xmcl.runtime.threads import ThreadBudget


@dataclass
class RunConfig:
    """Run controls, the same for every system.

    ``seed`` seeds every random stream; ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...;
    ``threads``: CPU threads for torch's operators; 0 (the default) = the cores this process may use minus those
    other processes keep busy, re-checked every 30 s, so that a run beside other work slows in proportion to its
    share of the cores (``xmcl.runtime.threads``);
    ``progress``: progress bars; ``checkpoint_every``: also write ``last.pt`` every N optimiser steps (0 = at
    epoch ends and at the end only); ``log_every``: one log line per N steps; ``amp``: mixed precision, "none",
    "bf16" (CUDA where supported, or CPU) or "fp16" (CUDA only, with a GradScaler; ``xmcl.runtime.precision``);
    ``report_to``: where else the log records go: ``[tensorboard]`` = also as TensorBoard scalars in
    ``OUT/tensorboard`` (rank 0; needs the ``tensorboard`` package, refused when it is not importable);
    ``compile``: ``torch.compile`` the model's towers (``nn.Module.compile``: the same parameters and checkpoint keys;
    retrieval and CLIP training, refused by ST-SLidR, whose sparse networks change shape with every sweep). Off by
    default: on CPU the compiled locked USER step measured no faster than the eager one (docs/results.md, "Training
    steps against the hardware"), and compiling costs tens of seconds to minutes at the start of a run.
    """

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    checkpoint_every: int = 0
    log_every: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)
    compile: bool = False

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
        if "tensorboard" in self.report_to and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("run.report_to: tensorboard needs the tensorboard package, which is not importable "
                              "in this environment: pip install tensorboard, or drop it from run.report_to")


def start_run(run: RunConfig) -> tuple[torch.device, ThreadBudget]:
    """Apply ``run``: torch threads (``ThreadBudget``; a loop calls its ``update`` at every step), every seed, freed
    memory kept for the next step (``xmcl.runtime.allocator``), a C++ compiler where ``compile`` needs one on CPU,
    and on CUDA cuDNN's autotuner (``cudnn.benchmark``: the fastest kernels for the run's shapes); returns the
    resolved device and the thread budget."""
    keep_freed_memory()
    device = resolve_device(run.device)
    if run.compile and device.type == "cpu":
        require_cpu_compiler()
    threads = ThreadBudget(run.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(run.seed)
    return device, threads


def require_cpu_compiler() -> None:
    """``torch.compile`` builds its CPU kernels with a C++ compiler (``$CXX``, else ``g++``): refuse ``run.compile``
    at the start of a run where there is none, rather than at the first step inside the compiler."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ConfigError(f"run.compile: true needs a C++ compiler on CPU (torch.compile builds its kernels with "
                          f"{compiler}, which is not on PATH): install one (Debian: apt-get install g++), point $CXX "
                          f"at it, or set run.compile: false")
