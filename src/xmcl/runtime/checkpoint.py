"""Checkpoint files: one header for every kind, atomic writes, and loads that name what is wrong.

A checkpoint is a dict ``{"kind": str, "version": int, ...payload}`` written with ``torch.save`` through an atomic
rename (a crash mid-write never corrupts the previous file). ``load_checkpoint(path, kind)`` refuses a file of
another kind, or of a version this code does not read, with a message naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xmcl.errors import CheckpointError
from xmcl.runtime.files import atomic_write_bytes

# Headers written before the common one, recognised only to name them in the refusal.
_OLD_HEADERS = {"format": "xmcl.retrieval/1"}


def save_checkpoint(path: Path, kind: str, version: int, payload: dict[str, Any]) -> None:
    """Write ``{"kind", "version", **payload}`` to ``path`` atomically."""
    state = {"kind": kind, "version": version, **payload}
    atomic_write_bytes(Path(path), lambda handle: torch.save(state, handle))


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw dict stored at ``path`` (no header check); a missing or unreadable file raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of state")
    return state


def load_checkpoint(path: Path, kind: str, version: int, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path``, which must be of ``kind`` and ``version``; anything else raises
    CheckpointError naming what the file holds and what was expected."""
    state = read_checkpoint(path, map_location)
    found_kind, found_version = state.get("kind"), state.get("version")
    if found_kind is None:
        old = next((f"{key} {state[key]!r}" for key in _OLD_HEADERS if key in state), "no kind/version header")
        raise CheckpointError(f"checkpoint {path} is of an earlier xmcl format ({old}); this xmcl reads {kind} "
                              f"version {version}: retrain, or use the xmcl release that wrote it")
    if found_kind != kind:
        raise CheckpointError(f"checkpoint {path} is a {found_kind!r} checkpoint, not {kind!r}")
    if found_version != version:
        raise CheckpointError(f"checkpoint {path} is {kind} version {found_version!r}; this xmcl reads version "
                              f"{version}: retrain, or use the xmcl release that wrote it")
    return state
