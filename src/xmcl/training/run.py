"""Pieces every training loop shares (not a framework: each loop stays written out).

``RunFolder``: the files of a run folder, held under an exclusive lock (``xmcl.runtime.lock``) for the whole run.
``Checkpointer``: saves checkpoints of one kind and version, and decides how a run starts: resume ``last.pt`` (every
config key must match the saved one, except the keys the loop declares resumable), start afresh, or refuse
(``--no-resume`` into a folder that already holds a run, unless ``overwrite``). ``check_finite``: stop on a NaN/inf
loss, keeping the last good checkpoint. ``StepLogger``: progress bar, JSONL log (cut back to a resumed checkpoint's
length, so no step is logged twice) and PNG curves (redrawn within a share of the run's time). ``StopSignals``:
SIGINT / SIGTERM stop the loop at the next step boundary where the loop syncs (a log step), after a checkpoint
(``agreed``: every rank stops at the same one).
``capture_states`` / ``restore_states``: the state dicts of a loop's stateful objects (model, optimiser, scheduler,
random streams, ...) and the global RNG, by name. ``run_loop``: a trainer's entry (process group, folder held, stop
signals); ``announce_finished`` / ``announce_resume``: the notes every loop prints when it resumes.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import yaml
from tqdm import tqdm

from xmcl.config import config_from_dict, config_to_dict
from xmcl.errors import CheckpointError, RunFolderError, RunInterrupted, TrainingDiverged, brief
from xmcl.runtime.checkpoint import load_checkpoint, save_checkpoint
from xmcl.runtime.device import resolve_device
from xmcl.runtime.distributed import World, close_world, fail_together, init_world, mean_over_ranks
from xmcl.runtime.files import atomic_write_text
from xmcl.runtime.lock import RunLock, describe_holder
from xmcl.runtime.log import JsonlLogger, plot_curves
from xmcl.runtime.rng import capture_rng_state, restore_rng_state
from xmcl.training.progress import TrainingProgress
from xmcl.training.sharding import check_world_size

T = TypeVar("T")
PLOT_SHARE = 0.02  # the most of a run's wall time that redrawing curves.png may take before the final drawing

# Run controls that may change when a run resumes (the seed may not: it fixes every random stream).
RESUMABLE_RUN_KEYS = frozenset({"run.device", "run.threads", "run.progress", "run.checkpoint_every", "run.log_every",
                                "run.amp", "run.report_to", "run.compile"})


def announce(message: str, enabled: bool = True) -> None:
    """Print a line to stderr without breaking a progress bar (``enabled=False``: a silenced run)."""
    if enabled:
        tqdm.write(message, file=sys.stderr)


class RunFolder:
    """``config.yaml``, ``last.pt``, ``best.pt``, ``log.jsonl``, ``curves.png`` and ``tensorboard/`` (with
    ``run.report_to: [tensorboard]``) of one run folder, plus the ``outputs`` (file names) a loop also writes there;
    ``locked()`` holds the folder's lock."""

    def __init__(self, root: Path | str, outputs: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.last = self.root / "last.pt"
        self.best = self.root / "best.pt"
        self.log = self.root / "log.jsonl"
        self.curves = self.root / "curves.png"
        self.tensorboard = self.root / "tensorboard"
        self.outputs = tuple(self.root / name for name in outputs)

    @contextmanager
    def locked(self, verbose: bool = True) -> Iterator[RunLock]:
        """Hold the folder's exclusive lock (created if missing; ``RunFolderError`` if another process holds it)."""
        with RunLock(self.root) as lock:
            if lock.stale_holder:
                announce(f"{self.root}: took over the lock left by {describe_holder(lock.stale_holder)}, which is "
                         f"no longer running", verbose)
            yield lock

    def run_files(self) -> list[Path]:
        """The files of a run that exist in the folder."""
        return [p for p in (self.config, self.last, self.best, self.log, self.curves, self.tensorboard, *self.outputs)
                if p.exists()]

    def clear(self) -> None:
        """Delete the run's files (``--overwrite``); other files of the folder are left alone."""
        for path in self.run_files():
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def write_config(self, cfg: Any) -> None:
        """Write the run's config (atomically): the file the run can be reproduced from."""
        atomic_write_text(self.config, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

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
    """Checkpoints of one ``kind`` and ``version`` in a run folder, and the start / resume policy.

    ``resumable``: dotted config keys (or sections ending in ".") that may differ between the saved run and the
    resumed one, in addition to ``RESUMABLE_RUN_KEYS``.
    """

    def __init__(self, folder: RunFolder, kind: str, version: int, resumable: Iterable[str] = ()) -> None:
        self.folder, self.kind, self.version = folder, kind, version
        self.resumable = frozenset(resumable) | RESUMABLE_RUN_KEYS

    def may_change(self, key: str) -> bool:
        """Whether the dotted config ``key`` may differ when a run resumes."""
        return _is_resumable(key, self.resumable)

    def save(self, path: Path, cfg: Any, payload: dict[str, Any]) -> None:
        """Write ``payload`` and the run's config under this checkpointer's header, atomically."""
        save_checkpoint(path, self.kind, self.version, {"config": config_to_dict(cfg), **payload})

    def start(self, cfg: Any, resume: bool, overwrite: bool = False) -> dict | None:
        """How the run in the (locked) folder starts: the state of ``last.pt`` to resume from, or None to start
        afresh. ``overwrite`` deletes the run's files first. Refused (``RunFolderError``): starting afresh
        (``resume=False``) where a run's files exist, or where a ``best.pt`` / output has no ``last.pt`` to resume
        (either would destroy them); resuming a checkpoint of another kind, version or config (``CheckpointError``
        naming the keys that differ)."""
        if overwrite:
            self.folder.clear()
            return None
        existing = self.folder.run_files()
        if resume and self.folder.last.is_file():
            return self._resumable_state(cfg)
        names = ", ".join(p.name for p in existing)
        if existing and not resume:
            raise RunFolderError(f"{self.folder.root} already holds a run ({names}); --no-resume would start over "
                                 f"and destroy it: add --overwrite to replace it, drop --no-resume to continue it, "
                                 f"or use another --out folder")
        if any(p not in (self.folder.config, self.folder.log, self.folder.curves, self.folder.tensorboard)
               for p in existing):
            raise RunFolderError(f"{self.folder.root} holds {names} but no last.pt to resume from; starting afresh "
                                 f"would destroy them: pass --overwrite to replace them, or use another --out folder")
        return None  # a run that never wrote a checkpoint: its config and log are replaced

    def start_together(self, cfg: Any, resume: bool, overwrite: bool, world: World) -> dict | None:
        """``start`` for every rank of ``world``: rank 0 decides (and clears the folder for ``overwrite``), then the
        other ranks read what it left and every rank checks the saved world size (``check_world_size``). A
        refusal on any rank ends every rank at once with its message (``fail_together``). One process: ``start``
        plus the world-size check."""
        with fail_together(world):
            state = self.start(cfg, resume, overwrite) if world.is_main else None
        with fail_together(world):
            if not world.is_main:
                state = self.start(cfg, resume=True)
            if state is not None:
                check_world_size(state, world, self.folder.last)
        return state

    def _resumable_state(self, cfg: Any) -> dict:
        state = load_checkpoint(self.folder.last, self.kind, self.version)
        saved_cfg = config_from_dict(type(cfg), state["config"], where=str(self.folder.last))  # keys renamed since
        saved, now = _flatten(config_to_dict(saved_cfg)), _flatten(config_to_dict(cfg))
        changed = [key for key in sorted(set(saved) | set(now))
                   if saved.get(key) != now.get(key) and not self.may_change(key)]
        if changed:
            listed = "; ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            allowed = ", ".join(sorted(self.resumable))
            raise CheckpointError(f"{self.folder.last} was trained with another config ({listed}{more}); only "
                                  f"{allowed} may change on resume: use the run's config ({self.folder.config}), "
                                  f"another --out folder, or --no-resume --overwrite")
        return state


def capture_states(**stateful: Any) -> dict[str, Any]:
    """``{name: obj.state_dict()}`` for each named object, plus ``"rng"``: every global generator's state."""
    return {**{name: obj.state_dict() for name, obj in stateful.items()}, "rng": capture_rng_state()}


def restore_states(state: dict[str, Any], where: Path | str, **stateful: Any) -> None:
    """Load ``state[name]`` into each named object and restore the global generators (``capture_states``' inverse);
    a state that does not fit (a missing entry or weight, another shape) raises ``CheckpointError`` naming
    ``where`` (the checkpoint) and the object."""
    for name, obj in stateful.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {where} has no '{name}' state; it was not written by this loop")
        try:
            obj.load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            raise CheckpointError(f"checkpoint {where}: its '{name}' state does not fit this run: "
                                  f"{brief(error)}") from None
    try:
        restore_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {where}: its random-generator state is unreadable ({error})") from None


def check_finite(loss: float, where: str, folder: RunFolder) -> None:
    """Raise ``TrainingDiverged`` when ``loss`` is NaN or infinite (``where``: e.g. "epoch 2, step 5")."""
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise TrainingDiverged(f"loss became {loss} at {where}; training stopped, the last good checkpoint is "
                               f"{folder.last_good()}")


def run_loop(folder: RunFolder, device: str, progress: bool, body: Callable[[bool, "StopSignals", World], T]) -> T:
    """A trainer's entry: start the process group for ``device`` (none for one process), hold ``folder``
    (``hold_folder``) and return ``body(verbose, stop, world)``, ``verbose`` being ``progress`` on rank 0 only; the
    group is closed whatever happens."""
    world = init_world(resolve_device(device))
    verbose = progress and world.is_main
    try:
        with hold_folder(folder, world, verbose) as stop:
            return body(verbose, stop, world)
    finally:
        close_world(world)


@contextmanager
def hold_folder(folder: RunFolder, world: World, verbose: bool) -> Iterator["StopSignals"]:
    """A run's hold on its folder: the folder's lock, taken by rank 0 (a lock held elsewhere ends every rank at
    once with rank 0's message), and the stop signals (yielded), for the whole run."""
    with ExitStack() as held:
        with fail_together(world):
            if world.is_main:
                held.enter_context(folder.locked(verbose))
        yield held.enter_context(StopSignals(verbose))


def announce_finished(checkpointer: Checkpointer, done: str, length_key: str, verbose: bool) -> None:
    """The note of a resumed run with nothing left to do (``done``: e.g. "3 of 3 epochs done (best ...)"); it
    suggests raising ``length_key`` only where the checkpointer lets that key change on resume."""
    longer = (f"Set a larger {length_key} to train longer, or pass" if checkpointer.may_change(length_key)
              else "Pass")
    announce(f"{checkpointer.folder.root} already finished: {done}; nothing to do. {longer} --no-resume --overwrite "
             f"to start over", verbose)


def announce_resume(folder: RunFolder, position: str, verbose: bool) -> None:
    """The note of a run resuming from ``folder/last.pt`` at ``position``."""
    announce(f"resuming {folder.last} from {position}", verbose)


def epochs_all_done(checkpointer: Checkpointer, progress: TrainingProgress, epochs: int, verbose: bool) -> bool:
    """Whether a resumed epoch-based run has done all ``epochs`` (``optim.epochs``); says so, or says where it
    resumes."""
    if progress.epoch >= epochs:
        announce_finished(checkpointer, f"{progress.epoch} of {epochs} epochs done (best val rSum "
                          f"{progress.best_rsum:.2f} at epoch {progress.best_epoch})", "optim.epochs", verbose)
        return True
    announce_resume(checkpointer.folder, progress.position(), verbose)
    return False


class StopSignals:
    """While active (``with StopSignals() as stop:``), SIGINT and SIGTERM do not kill the loop: the first sets
    ``requested`` (the signal's name), and the loop checkpoints at its next sync point (a log step) and raises
    ``stop.interrupted(...)``; a second signal stops at once (``KeyboardInterrupt``). Outside the main thread,
    where handlers cannot be installed, signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        announce(f"\n{self.requested} received: saving a checkpoint after this step, then stopping (send it again "
                 f"to stop at once, losing the steps since the last checkpoint)", self.verbose)

    def agreed(self, world: World, device: torch.device) -> bool:
        """Whether any rank of ``world`` received a stop signal (a collective: every rank calls it at the same
        step, and all get the same answer, so they stop together)."""
        return mean_over_ranks(float(self.requested is not None), world, device) > 0

    def interrupted(self, where: str, folder: RunFolder) -> RunInterrupted:
        """The error that ends a stopped run, saying where it stopped and how to resume."""
        return RunInterrupted(f"stopped by {self.requested} at {where}; everything up to there is saved in "
                              f"{folder.last}: run the same command again to resume")


class StepLogger:
    """A run's progress bar, its JSONL log (``log.jsonl``: one record per line, flushed) and its curves. The log is
    cut back to ``keep_bytes`` (the length a resumed checkpoint recorded; 0 for a fresh run). ``writes=False`` (the
    ranks other than 0 of a data-parallel run): no file is touched and nothing is shown.

    ``report_to`` containing "tensorboard": each record's numbers also go to TensorBoard scalars in
    ``folder.tensorboard`` at the record's ``step`` (flushed at each ``plot``); a resume from step ``resumed_step``
    purges the events after it, as the log drops its records.

    ``plot`` redraws ``curves.png`` (2-3 s for a retrieval run's 20-odd panels) only while the time spent drawing,
    this drawing included (estimated by the last one), stays within ``PLOT_SHARE`` of the time since the logger
    started (so the first drawing always happens), and always when ``final``. With epochs of 45 s and drawings of
    2.5 s that is every third epoch, against 5% of the run when every epoch redrew."""

    def __init__(self, folder: RunFolder, progress: bool, keep_bytes: int = 0, writes: bool = True,
                 report_to: Iterable[str] = (), resumed_step: int = 0) -> None:
        self.folder, self.progress, self.writes = folder, progress and writes, writes
        self.jsonl = JsonlLogger(folder.log)
        self.board = None
        if writes:
            self.jsonl.truncate(keep_bytes)
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(folder.tensorboard), purge_step=resumed_step + 1 if resumed_step
                                           else None)
        self._started = time.monotonic()
        self._drawing_s = 0.0  # seconds spent drawing so far
        self._last_drawing_s = 0.0

    def bar(self, iterable: Iterable, total: int, initial: int, desc: str, unit: str = "step") -> tqdm:
        """A progress bar over ``iterable`` (hidden when the run has no progress output)."""
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=not self.progress,
                    dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to the JSONL log."""
        if self.writes:
            self.jsonl.log(record)
        if self.board is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])

    def size(self) -> int:
        """The log's length in bytes (saved in checkpoints as ``log_bytes``)."""
        return self.jsonl.size()

    def note(self, message: str) -> None:
        """Print a line without breaking the progress bar (only when the run shows progress)."""
        if self.progress:
            tqdm.write(message)

    def plot(self, final: bool = False) -> None:
        """Redraw ``curves.png`` from the log within the time share (always when ``final``), and flush the
        TensorBoard events."""
        if self.writes and (final or self._drawing_s + self._last_drawing_s
                            <= PLOT_SHARE * (time.monotonic() - self._started)):
            began = time.monotonic()
            plot_curves(self.folder.log, self.folder.curves)
            self._last_drawing_s = time.monotonic() - began
            self._drawing_s += self._last_drawing_s
        if self.board is not None:
            self.board.flush()
