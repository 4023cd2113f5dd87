"""Embedding shards: float16 ``.npy`` files of one encoding pass each, and the sidecar that says what they hold.

A shard is written as ``shards/{kind}-{token}.npy`` (rows x dim float16, atomically), then its sidecar
``shards/{kind}-{token}.json`` = ``{"kind", "file", "rows": [...], "failures": [...]}`` (atomically): a sidecar
exists only beside a complete shard. The metadata store ingests a sidecar in one transaction and the sidecar is
deleted afterwards, so a crash at any point leaves either a pending sidecar (ingested at the next run) or an
ingested shard; never half of one. Shards are read memory-mapped and never hold pickles.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np

from xmcl.errors import CheckpointError
from xmcl.runtime.files import atomic_save_npy, atomic_write_json

SHARD_DIR = "shards"


def write_shard(folder: Path, kind: str, vectors: np.ndarray, rows: list[dict], failures: list[dict],
                rank: int = 0) -> Path:
    """Write a shard of ``vectors`` (float16) with its sidecar describing ``rows`` (one per vector, in order) and
    the ``failures`` met while encoding it; return the sidecar's path."""
    vectors = np.asarray(vectors, dtype=np.float16)
    if vectors.ndim != 2 or len(vectors) != len(rows):
        raise ValueError(f"a shard needs one row description per vector, got {vectors.shape} for {len(rows)} rows")
    shard_dir = Path(folder) / SHARD_DIR
    name = f"{kind}-r{rank}-{secrets.token_hex(6)}"
    atomic_save_npy(shard_dir / f"{name}.npy", vectors)
    sidecar = shard_dir / f"{name}.json"
    atomic_write_json(sidecar, {"kind": kind, "file": f"{name}.npy", "rows": rows, "failures": failures})
    return sidecar


def pending_sidecars(folder: Path) -> list[Path]:
    """Sidecars not yet ingested, in name order."""
    shard_dir = Path(folder) / SHARD_DIR
    return sorted(shard_dir.glob("*.json")) if shard_dir.is_dir() else []


def read_sidecar(path: Path) -> dict:
    """A sidecar's content; ``CheckpointError`` naming it when it is unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable shard description ({error}); remove it and its .npy") from None
    if not isinstance(data, dict) or not {"kind", "file", "rows", "failures"} <= set(data):
        raise CheckpointError(f"{path}: not a shard description")
    return data


def load_shard(folder: Path, file: str) -> np.ndarray:
    """The shard ``file`` (rows x dim float16), memory-mapped; ``CheckpointError`` when missing or malformed."""
    path = Path(folder) / SHARD_DIR / file
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: missing or unreadable embedding shard ({error})") from None
    if array.ndim != 2 or array.dtype != np.float16:
        raise CheckpointError(f"{path}: expected a (rows, dim) float16 shard, got {array.shape} {array.dtype}")
    return array


def remove_shard(folder: Path, file: str) -> None:
    """Delete a shard file (its rows are no longer referenced)."""
    (Path(folder) / SHARD_DIR / file).unlink(missing_ok=True)
