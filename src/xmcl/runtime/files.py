"""Atomic writes: a file or folder appears whole or not at all.

Each write goes to a temporary sibling, is flushed and fsynced, then renamed over the target: the rename is the
commit point, so a crash mid-write leaves the previous version (or nothing) in place, never a torn file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def atomic_write_bytes(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` (no pickles) to ``path`` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getbuffer()))


@contextmanager
def _staging(target: Path, tag: str) -> Iterator[Path]:
    """An empty folder beside ``target``, removed (with whatever is left in it) when the block ends."""
    staging = target.parent / f".{target.name}.{tag}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds it is renamed to ``target``, when it
    fails it is removed, so ``target`` appears complete or not at all. An existing ``target`` is removed just
    before the rename when ``replace`` (else only an empty folder may stand there)."""
    target = Path(target)
    with _staging(target, "partial") as staging:
        yield staging
        if replace and target.is_dir():
            shutil.rmtree(target)
        elif replace and target.exists():
            target.unlink()
        os.replace(staging, target)


@contextmanager
def atomic_files_into(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds each file written there replaces its namesake in
    ``target`` (created if needed; other files of ``target`` are kept). Each file is replaced whole."""
    target = Path(target)
    with _staging(target, "saving") as staging:
        yield staging
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(staging.iterdir()):
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(file, target / file.name)
