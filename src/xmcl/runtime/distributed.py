"""torch.distributed for the loops: the process group a ``torchrun`` launch describes, and the collectives the
losses and queues need. One process (no ``WORLD_SIZE`` > 1 in the environment) is a world of size 1 where every
collective is the identity, so the same code runs with and without a launcher.

Backend: gloo on CPU, nccl on CUDA (chosen from the device). Every collective has a timeout
(``init_world(timeout_s=...)``): a rank that dies makes the others fail instead of hanging.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from xmcl import errors
from xmcl.errors import ConfigError, XmclError


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and curves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE_PROCESS = World()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launch (or not launched distributed): the one that prints a
    command's summary. Read from ``RANK``, so it holds before and after the process group exists."""
    return _env_int("RANK", 0) == 0


def init_world(device: torch.device, timeout_s: float = 600.0) -> World:
    """The world ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` or a
    rendezvous), with its process group initialised; ``SINGLE_PROCESS`` when not launched distributed."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE_PROCESS
    world = World(rank=_env_int("RANK", 0), size=size, local_rank=_env_int("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return world


def close_world(world: World) -> None:
    """Destroy the process group of a distributed world (no-op for one process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(tensor: Tensor, world: World) -> Tensor:
    """Rows of every rank concatenated in rank order; the gradient of each rank's loss flows back to the rows'
    owners (the backward is a reduce-scatter), so a loss over the gathered rows trains every rank's tower."""
    if not world.distributed:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single_autograd

    gathered = all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD)
    return gathered.wait() if hasattr(gathered, "wait") else gathered


def gather_uneven(tensor: Tensor, world: World, with_grad: bool = True) -> Tensor:
    """Rows of every rank concatenated in rank order where ranks hold different numbers of rows (superpixels of
    different scenes): the row counts are gathered, each rank's rows padded to the largest count, gathered
    (``gather_with_grad``, or ``gather_no_grad`` when not ``with_grad``) and the padding cut out again, so the
    gradient of the real rows flows back to their owners and the padding's is dropped."""
    if not world.distributed:
        return tensor
    counts = gather_no_grad(torch.tensor([tensor.shape[0]], device=tensor.device), world).tolist()
    most = max(counts)
    padded = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, most - tensor.shape[0]))
    gathered = gather_with_grad(padded, world) if with_grad else gather_no_grad(padded, world)
    return torch.cat([gathered[rank * most: rank * most + count] for rank, count in enumerate(counts)])


@torch.no_grad()
def gather_no_grad(tensor: Tensor, world: World) -> Tensor:
    """Rows of every rank concatenated in rank order, without gradient (momentum keys and their ids)."""
    if not world.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(value: float, world: World, device: torch.device | str = "cpu") -> float:
    """The mean of a number over the ranks (``device``: where the backend reduces: CUDA for nccl)."""
    if not world.distributed:
        return value
    return float(tensor_mean_over_ranks(torch.tensor([value], dtype=torch.float64, device=device), world))


def tensor_mean_over_ranks(tensor: Tensor, world: World) -> Tensor:
    """The element-wise mean of ``tensor`` over the ranks (one all-reduce on its device; itself in one process)."""
    if not world.distributed:
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed / world.size


def data_parallel(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``module`` under ``DistributedDataParallel`` in ``world``; ``module`` itself in one process. Call the
    returned module for the training forward: its backward averages the gradients over the ranks in buckets, each
    sent while the rest of the backward runs. Keep the returned module alive through the backward (its reducer
    does the averaging). Parameters without ``requires_grad`` (a MoCo key encoder, a frozen backbone) are left out
    and follow their own rule; buffers are synchronised from rank 0 once, at the wrap, and not at each forward (each
    rank keeps the BatchNorm statistics and queues its loop gives it, identical where the loop gathers). The
    wrapper holds no state of its own: checkpoint ``module``."""
    if not world.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def barrier(world: World) -> None:
    """Wait until every rank reaches this point (no-op for one process)."""
    if world.distributed:
        dist.barrier()


def broadcast_from_main(value: float, world: World, device: torch.device | str = "cpu") -> float:
    """Rank 0's ``value`` on every rank (what rank 0 alone computed, such as the validation rSum)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor)


def _outcome(error: BaseException | None) -> tuple[str, str] | None:
    """What a rank tells the others about its failure: the error's class name and its message."""
    if error is None:
        return None
    return type(error).__name__, str(error) if isinstance(error, XmclError) else errors.brief(error)


def _rebuilt(rank: int, name: str, message: str) -> XmclError:
    """The error a rank raises for rank ``rank``'s failure: the same ``XmclError`` class and message (so the same
    line and exit status), or a plain ``XmclError`` naming the rank and the foreign error."""
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, XmclError):
        return kind(message)
    return XmclError(f"rank {rank} failed: {name}: {message}")


@contextmanager
def fail_together(world: World) -> Iterator[None]:
    """Run the block on every rank, then compare the outcomes (one all-gather): if the block raised on any rank,
    every rank raises at once. A failing rank re-raises its own error; the others raise the first failing rank's
    (the same ``XmclError`` class and message), so a refusal on rank 0 (folder locked, ``--no-resume`` into a used
    folder, a changed config) ends the job instead of leaving the other ranks at a collective until its timeout.
    A collective: every rank must enter it, none may skip it (no-op for one process)."""
    if not world.distributed:
        yield
        return
    try:
        yield
    except BaseException as error:
        try:
            _share_outcome(world, error)
        except Exception:  # noqa: BLE001 - the group is broken too (a dead peer): this rank's error is the news
            pass
        raise
    failed = _share_outcome(world, None)
    if failed is not None:
        raise failed


def _share_outcome(world: World, error: BaseException | None) -> XmclError | None:
    outcomes: list[tuple[str, str] | None] = [None] * world.size
    dist.all_gather_object(outcomes, _outcome(error))
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            return _rebuilt(rank, *outcome)
    return None
