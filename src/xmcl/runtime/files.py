"""Atomic writes: a file or folder appears whole or not at all; and the checks of an output path.

Each write goes to a temporary sibling (``.NAME.xmcl-XXXX.tmp``), is flushed and fsynced, then renamed over the
target: the rename is the commit point, so a crash mid-write leaves the previous version (or nothing) in place,
never a torn file. Files get the mode the umask gives (``0o666 & ~umask``), as ``open`` would. A process killed
mid-write leaves its temporary behind; ``remove_stale_temporaries`` clears them from a folder its caller holds
locked (``xmcl.runtime.lock``).
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

from xmcl.errors import RunFolderError, WriteError

TEMPORARY_TAG = ".xmcl-"  # in the names of every temporary file and staging folder written here


def _umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open``: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path`` and rename it over ``path``; a failing
    write (disk full, file too large, no permission) raises ``WriteError`` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMPORARY_TAG}", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = f"; the previous {path.name} is kept" if path.is_file() else ""
            raise WriteError(f"cannot write {path}: {error.strerror or error}{kept}") from None
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
    staging = target.parent / f".{target.name}{TEMPORARY_TAG}{tag}-{os.getpid()}"
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
    target.mkdir(parents=True, exist_ok=True)
    with _staging(target / "staging", "saving") as staging:  # inside ``target``: its lock covers the leftovers
        yield staging
        for file in sorted(staging.iterdir()):
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(file, target / file.name)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries (files and staging folders) that writes killed mid-way left under ``folder``; only
    for a caller that holds the folder's lock, so that no live write owns them. Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).rglob(f".*{TEMPORARY_TAG}*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: Path, what: str = "output folder") -> None:
    """Refuse, before any work, a folder that cannot be made or written: ``path`` or one of its parents is a
    file, or the nearest existing parent is not writable. ``RunFolderError`` names the path and the problem."""
    path = Path(path)
    existing = _first_existing(path.absolute())
    if existing == path.absolute() and not existing.is_dir():
        raise RunFolderError(f"{what} {path} is a file, not a folder")
    if not existing.is_dir():
        raise RunFolderError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path} cannot be written: {existing} is not writable")


def check_output_file(path: Path, what: str = "output file") -> None:
    """Refuse, before any work, a file path that cannot be written: a folder stands there, a parent is a file, or
    the nearest existing parent is not writable. ``RunFolderError`` names the path and the problem."""
    path = Path(path)
    if path.is_dir():
        raise RunFolderError(f"{what} {path} is a folder; give a file path, e.g. {path / 'metrics.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunFolderError(f"{what} {path} is not writable")
    check_output_dir(path.parent, f"the folder of {what}")
