"""Seeding, explicit generators, and the capture / restore of random streams in checkpoint-safe form.

Every state here is made of tensors, lists, strings and numbers only, so that a checkpoint holding it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed drawn from non-negative integers through NumPy's ``SeedSequence``: ``(seed, purpose, step)``
    gives one independent stream per purpose and step."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded by ``derived_seed(*entropy)`` (independent of the global RNG)."""
    return torch.Generator().manual_seed(derived_seed(*entropy))


def capture_rng_state() -> dict:
    """The state of every global generator (Python, NumPy, torch CPU and CUDA), as tensors, lists and numbers."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generators saved by ``capture_rng_state`` (CUDA only where it was saved and is present)."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TorchStream:
    """A random stream of its own for code that can only draw from torch's global generator (``nn.Dropout``, a
    ``torch.rand`` without a generator): inside ``with stream.active():`` the global generator of the CPU (and of
    ``device`` when it is a CUDA device) runs on this stream's state; outside, the global state is as it was.
    Its ``state_dict`` goes into checkpoints, so whatever else draws from the global generator between two steps
    (a DataLoader starting, a library) never shifts the stream."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(seed)
            self._capture()

    def _capture(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draw from this stream inside the block."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            try:
                yield
            finally:
                self._capture()

    def state_dict(self) -> dict:
        return {"cpu": self.cpu, "cuda": list(self.cuda)}

    def load_state_dict(self, state: dict) -> None:
        self.cpu = state["cpu"]
        if len(state["cuda"]) == len(self.devices):  # a run resumed on another device keeps its fresh CUDA stream
            self.cuda = list(state["cuda"])
