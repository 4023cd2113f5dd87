"""Choosing the torch device from a config string, the CPU cores a process may use, and its peak memory."""

from __future__ import annotations

import os

import torch

from xmcl.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as torch reads it (CUDA must be present). Under a
    launcher (``LOCAL_RANK`` set), ``auto`` and a bare ``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``, which
    is also made the current CUDA device (what nccl's collectives use)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: '{name}' is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but is not available")
    return device


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process has held so far, in MiB: on CUDA the tensors allocated on ``device``
    (``torch.cuda.max_memory_allocated``), on CPU the process's peak resident set (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
