"""Pieces every training loop shares (not a framework: each loop stays written out).

``RunFolder``: the files of a run folder. ``Checkpointer``: saves checkpoints of one kind and version, and loads
``last.pt`` for a resume under one compatibility policy: every config key must match the saved one, except the
keys the loop declares resumable. ``check_finite``: stop on a NaN/inf loss, keeping the last good checkpoint.
``StepLogger``: progress bar, JSONL log and PNG curves. ``capture_states`` / ``restore_states``: the state dicts
of a loop's stateful objects (model, optimiser, scheduler, ...) and the global RNG, by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from xmcl.config import config_to_dict, save_config
from xmcl.errors import CheckpointError, TrainingDiverged
from xmcl.runtime.checkpoint import load_checkpoint, save_checkpoint
from xmcl.runtime.log import JsonlLogger, plot_curves
from xmcl.runtime.rng import capture_rng_state, restore_rng_state

# Run controls that may change when a run resumes (the seed may not: it fixes every random stream).
RESUMABLE_RUN_KEYS = frozenset({"run.device", "run.threads", "run.progress", "run.checkpoint_every", "run.log_every"})


class RunFolder:
    """``config.yaml``, ``last.pt``, ``best.pt``, ``log.jsonl`` and ``curves.png`` of one run folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.last = self.root / "last.pt"
        self.best = self.root / "best.pt"
        self.log = self.root / "log.jsonl"
        self.curves = self.root / "curves.png"

    def create(self, cfg: Any) -> None:
        """Make the folder and write the run's config."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config)

    def last_good(self) -> str:
        """The path of ``last.pt``, or a note that none was written yet (for error messages)."""
        return str(self.last) if self.last.is_file() else "not written yet"


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _is_resumable(key: str, resumable: Iterable[str]) -> bool:
    """``key`` is listed, or lies under a listed section (a listed name ending in ".")."""
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in resumable)


class Checkpointer:
    """Checkpoints of one ``kind`` and ``version`` in a run folder, and the resume policy.

    ``resumable``: dotted config keys (or sections ending in ".") that may differ between the saved run and the
    resumed one, in addition to ``RESUMABLE_RUN_KEYS``.
    """

    def __init__(self, folder: RunFolder, kind: str, version: int, resumable: Iterable[str] = ()) -> None:
        self.folder, self.kind, self.version = folder, kind, version
        self.resumable = frozenset(resumable) | RESUMABLE_RUN_KEYS

    def save(self, path: Path, cfg: Any, payload: dict[str, Any]) -> None:
        """Write ``payload`` and the run's config under this checkpointer's header, atomically."""
        save_checkpoint(path, self.kind, self.version, {"config": config_to_dict(cfg), **payload})

    def resume_state(self, cfg: Any, resume: bool) -> dict | None:
        """The state in ``last.pt`` when resuming and it exists (None otherwise); a checkpoint of another kind,
        version or config is refused, naming the keys that differ."""
        if not resume or not self.folder.last.is_file():
            return None
        state = load_checkpoint(self.folder.last, self.kind, self.version)
        saved, now = _flatten(state["config"]), _flatten(config_to_dict(cfg))
        changed = [key for key in sorted(set(saved) | set(now))
                   if saved.get(key) != now.get(key) and not _is_resumable(key, self.resumable)]
        if changed:
            listed = "; ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise CheckpointError(f"{self.folder.last} was trained with another config ({listed}{more}); these keys "
                                  f"cannot change on resume; use another --out folder or --no-resume")
        return state


def capture_states(**stateful: Any) -> dict[str, Any]:
    """``{name: obj.state_dict()}`` for each named object, plus ``"rng"``: every global generator's state."""
    return {**{name: obj.state_dict() for name, obj in stateful.items()}, "rng": capture_rng_state()}


def restore_states(state: dict[str, Any], **stateful: Any) -> None:
    """Load ``state[name]`` into each named object and restore the global generators (``capture_states``' inverse)."""
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    restore_rng_state(state["rng"])


def check_finite(loss: float, where: str, folder: RunFolder) -> None:
    """Raise ``TrainingDiverged`` when ``loss`` is NaN or infinite (``where``: e.g. "epoch 2, step 5")."""
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise TrainingDiverged(f"loss became {loss} at {where}; training stopped, the last good checkpoint is "
                               f"{folder.last_good()}")


class StepLogger:
    """A run's progress bar, its JSONL log (``log.jsonl``: one record per line, flushed) and its curves."""

    def __init__(self, folder: RunFolder, progress: bool) -> None:
        self.folder, self.progress = folder, progress
        self.jsonl = JsonlLogger(folder.log)

    def bar(self, iterable: Iterable, total: int, initial: int, desc: str, unit: str = "step") -> tqdm:
        """A progress bar over ``iterable`` (hidden when the run has no progress output)."""
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=not self.progress,
                    dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to the JSONL log."""
        self.jsonl.log(record)

    def note(self, message: str) -> None:
        """Print a line without breaking the progress bar (only when the run shows progress)."""
        if self.progress:
            tqdm.write(message)

    def plot(self) -> None:
        """Redraw ``curves.png`` from the log."""
        plot_curves(self.folder.log, self.folder.curves)
