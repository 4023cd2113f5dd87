"""Seeding, explicit generators, and the capture / restore of every global random stream a run draws from."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from non-negative integers through NumPy's ``SeedSequence`` (independent of the
    global RNG): ``seeded_generator(seed, purpose, step)`` gives one stream per purpose and step."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))


def capture_rng_state() -> dict:
    """The state of every global generator (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generators saved by ``capture_rng_state`` (CUDA only where it was saved and is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
