"""Checkpoint files: one header for every kind, atomic writes, and loads that never run code.

A checkpoint is a dict ``{"kind": str, "version": int, ...payload}`` written with ``torch.save`` through an atomic
rename (a crash mid-write never corrupts the previous file). The payload holds only what ``torch.load(...,
weights_only=True)`` rebuilds without running code: tensors, dicts, lists, tuples, strings, numbers, booleans and
None (``save_checkpoint`` refuses anything else before writing). Every load is such a safe load, so a crafted file
(a pickle whose objects would call functions when built) is refused, naming the file and what it asked to build,
and nothing of it runs. ``load_checkpoint(path, kind, version)`` also refuses a file of another kind or version;
the header of a file written before this format (whose payload a safe load refuses) is read by walking the pickle's
opcodes without executing them, so the refusal names its version.
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from xmcl.errors import CheckpointError, WriteError, brief
from xmcl.runtime.files import atomic_write_bytes

# Headers written before the common one, recognised only to name them in the refusal.
_OLD_HEADERS = {"format": "xmcl.retrieval/1"}
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)
_HEADER_OPS = 64  # the header is among the first opcodes of the pickle


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects that only a full unpickler builds (loading them that way could run code)."""


def check_payload(value: Any, where: str = "payload") -> None:
    """Raise ``TypeError`` naming the entry of ``value`` that a safe load could not rebuild (a programming error:
    convert it to tensors, lists, dicts, strings or numbers first)."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (dict, collections.OrderedDict, collections.Counter)):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}, not a str or int")
            check_payload(item, f"{where}.{key}")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_payload(item, f"{where}[{index}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__qualname__}, which a safe "
                    f"load (torch.load weights_only=True) refuses")


def _write_failure(error: BaseException) -> str:
    """The reason of a failed write in plain words (torch's writer reports "[enforce fail at ...] ...")."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    return f"{text} (is the disk full or the folder not writable?)"


class _RecordingWriter:
    """A binary file seen through ``write`` and ``flush`` only, keeping the ``OSError`` a write raised (torch's
    zip writer turns it into a message without the reason)."""

    def __init__(self) -> None:
        self.error: OSError | None = None
        self._handle: Any = None

    def wrap(self, handle: Any) -> "_RecordingWriter":
        self._handle = handle
        return self

    def write(self, data: bytes) -> int:
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self._handle.flush()


def save_checkpoint(path: Path, kind: str, version: int, payload: dict[str, Any]) -> None:
    """Write ``{"kind", "version", **payload}`` to ``path`` atomically; a failed write raises ``CheckpointError``
    naming the path and the reason, and keeps the previous file."""
    path = Path(path)
    state = {"kind": kind, "version": version, **payload}
    check_payload(state)
    writer = _RecordingWriter()
    try:
        atomic_write_bytes(path, lambda handle: torch.save(state, writer.wrap(handle)))
    except RuntimeError as error:  # torch's writer hides the OS error ("[enforce fail at inline_container.cc...")
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        reason = writer.error.strerror if writer.error is not None else _write_failure(error)
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}{kept}") from None
    except WriteError as error:
        raise CheckpointError(f"{str(error).replace('cannot write', 'cannot write checkpoint', 1)}") from None


def _refused_global(error: Exception) -> str | None:
    """What a refused pickle asked to build, from torch's message ("Unsupported global: GLOBAL builtins.exec");
    None when the refusal is not about a global."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def safe_load(path: Path, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain values only, never code. ``what`` names the file
    in errors ("checkpoint", "backbone weights", ...): ``UnsafeCheckpointError`` for a file that asks to build other
    objects, ``CheckpointError`` for a truncated or foreign one."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_global(error)
        if refused is None:  # junk, or a pickle made of operations the safe unpickler does not run at all
            operand = re.search(r"Unsupported operand (\d+)", str(error))
            detail = f" (pickle operation {operand.group(1)} is not allowed)" if operand else ""
            raise CheckpointError(f"{what} {path} cannot be read: it is not a file of tensors and plain values"
                                  f"{detail}") from None
        raise UnsafeCheckpointError(
            f"{what} {path} is refused: it asks to build {refused}, which a checkpoint never needs and which could "
            f"run code; xmcl loads only tensors and plain values (only load files from people you trust)") from None
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{what} {path} cannot be read: {brief(error, lines=1)}") from None


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw dict stored at ``path`` (no header check), loaded safely (``safe_load``); a missing, unreadable or
    unsafe file raises ``CheckpointError`` (``UnsafeCheckpointError`` when it holds more than tensors and plain
    values)."""
    path = Path(path)
    if path.is_dir():
        hint = next((f"; did you mean {path / name}?" for name in ("best.pt", "last.pt") if (path / name).is_file()),
                    "")
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = safe_load(path, "checkpoint", map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of state")
    return state


def peek_header(path: Path) -> tuple[Any, Any] | None:
    """``(kind, version)`` of a torch zip checkpoint read from its pickle's first opcodes, without building any
    object (so also for files a safe load refuses); None when the file has no such header."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            data = archive.read(name)
        values = []
        for index, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if index >= _HEADER_OPS:
                break
            if opcode.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1",
                               "BININT2", "LONG1"):
                values.append(arg)
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return None
    found = {}
    for key, value in zip(values, values[1:]):
        if key in ("kind", "version") and key not in found:
            found[key] = value
    return (found["kind"], found.get("version")) if isinstance(found.get("kind"), str) else None


def load_checkpoint(path: Path, kind: str, version: int, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path``, which must be of ``kind`` and ``version``; anything else raises
    CheckpointError naming what the file holds and what was expected."""
    try:
        state = read_checkpoint(path, map_location)
    except UnsafeCheckpointError:
        header = peek_header(Path(path))
        if header is not None and header[0] == kind and header[1] != version:
            raise CheckpointError(f"checkpoint {path} is {kind} version {header[1]!r}, a format from before "
                                  f"checkpoints were loaded safely; this xmcl reads version {version}: retrain, "
                                  f"or use the xmcl release that wrote it") from None
        raise
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
