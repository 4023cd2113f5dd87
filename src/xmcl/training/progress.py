"""Where a run stands: one record of progress, saved whole in each checkpoint and restored whole on resume."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xmcl.errors import CheckpointError
from xmcl.runtime.distributed import World, tensor_mean_over_ranks

# Keys a checkpoint written before they existed may lack, and their value then: the best epoch's figures are
# unknown, and so is the time of the sessions before (NaN stays NaN as later sessions add to it).
_OPTIONAL = {"best_metrics": None, "train_seconds": math.nan}


@dataclass
class TrainingProgress:
    """A loop's position and running sums. ``epoch``: epochs finished; ``step_in_epoch``: steps done in the current
    epoch (a resume skips them); ``global_step``: steps done in all; ``best_rsum`` / ``best_epoch`` /
    ``best_metrics``: the best validation score so far, its epoch and figures; ``epoch_loss_sum`` /
    ``epoch_loss_count``: the current epoch's losses so far (so a resumed epoch's mean covers all its steps);
    ``train_seconds``: wall time spent in the loop up to the last checkpoint, summed over every session of the run
(NaN when a session's time is unknown).

    ``state_dict()`` is a flat mapping of these names, spread into a checkpoint; ``load_state_dict`` reads it back.
    The step-based pretraining loop uses ``global_step`` and ``train_seconds`` only."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_rsum: float = -math.inf
    best_epoch: int = 0
    best_metrics: dict[str, float] | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    train_seconds: float = 0.0
    _clock: float | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict[str, Any]:
        """The record as plain values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def load_state_dict(self, state: dict[str, Any], where: Path | str = "the checkpoint") -> None:
        """Take every field from ``state`` (a checkpoint); a missing one raises ``CheckpointError`` naming it, except
        the ones added later (``_OPTIONAL``), which take their unknown value."""
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            if f.name not in state and f.name in _OPTIONAL:
                setattr(self, f.name, _OPTIONAL[f.name])
                continue
            if f.name not in state:
                raise CheckpointError(f"checkpoint {where} has no '{f.name}' entry: it was written before this "
                                      f"loop saved its progress record; retrain, or use the xmcl release that "
                                      f"wrote it")
            setattr(self, f.name, state[f.name])

    def start_clock(self) -> None:
        """Start counting this session's wall time (``lap`` adds it to ``train_seconds``)."""
        self._clock = time.perf_counter()

    def lap(self) -> None:
        """Add the time since the clock started (or last lapped) to ``train_seconds``: called as a checkpoint is
        written, so that the saved time, and a run's summary, count the loop up to its last checkpoint."""
        if self._clock is not None:
            now = time.perf_counter()
            self.train_seconds += now - self._clock
            self._clock = now

    def add_step(self) -> None:
        """One optimiser step done."""
        self.step_in_epoch += 1
        self.global_step += 1

    def add_losses(self, total: float, count: int) -> None:
        """The (rank-mean) losses of ``count`` steps, summing to ``total``, read at a sync point (``PendingLosses``)."""
        self.epoch_loss_sum += total
        self.epoch_loss_count += count

    def end_epoch(self, rsum: float, metrics: dict[str, float] | None = None) -> tuple[float | None, bool]:
        """Close the epoch with its validation ``rsum`` (and figures): returns the epoch's mean loss (None without
        steps) and whether ``rsum`` beat the best so far (which then becomes it)."""
        loss_mean = self.epoch_loss_sum / self.epoch_loss_count if self.epoch_loss_count else None
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        improved = rsum > self.best_rsum
        if improved:
            self.best_rsum, self.best_epoch, self.best_metrics = rsum, self.epoch, metrics
        return loss_mean, improved

    def position(self) -> str:
        """Where the next step starts, for messages: "epoch 3, step 5 (global step 29)"."""
        return f"epoch {self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step})"


class PendingLosses:
    """The step losses not yet read on the host, summed where they were computed (float64, on the loss's device),
    so that a step needs no host synchronisation: ``read`` brings them over, as means over the ranks of ``world``
    with one all-reduce, at the loop's sync points (log steps, checkpoints, an epoch's last step)."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.last = torch.zeros((), dtype=torch.float64, device=self.device)
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, loss: Tensor) -> None:
        """One step's loss (a scalar tensor)."""
        self.last = loss.detach().to(torch.float64)
        self.total = self.total + self.last
        self.count += 1

    def read(self) -> tuple[float, float, int]:
        """``(last, total, count)``: the last step's loss and the sum over the unread steps (each the mean over the
        ranks) and how many steps that sum covers; the pending sum starts again."""
        last, total = tensor_mean_over_ranks(torch.stack([self.last, self.total]), self.world).tolist()
        count = self.count
        self._reset()
        return last, total, count
