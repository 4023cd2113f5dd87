"""Runs one trainer in this process and, when asked, kills this very process with SIGKILL at a chosen point: the
subject of ``test_kill_resume.py`` (a real ``kill -9``: no handler, no ``finally``, no flush runs).

Usage: ``python kill_driver.py TRAINER OUT KILL [KEY=VALUE ...]`` with TRAINER ``retrieval``, ``distill`` or
``clip`` and KILL one of:

- ``none``: run to the end;
- ``backward:N``: during the N-th training step, before its backward pass;
- ``log:N``: right after the N-th log record is written (before any checkpoint that would follow it);
- ``save:N``: halfway through writing the N-th checkpoint file (half its bytes on disk);
- ``before:MODULE.NAME:N``: when the N-th call of the function ``NAME`` of ``MODULE`` starts.

Under ``torchrun`` a kill point ending in ``@R`` (``backward:4@1``) is armed on rank ``R`` only; the other ranks
run to the end (or until the job fails).
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys

import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(n: int):
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return hit


def arm(spec: str) -> None:
    """Install the kill point ``spec`` (see the module docstring)."""
    if spec == "none":
        return
    what, _, rest = spec.partition(":")
    target, _, count = rest.rpartition(":")
    hit = _counter(int(count))
    if what == "backward":
        backward = torch.Tensor.backward

        def killing_backward(self, *args, **kwargs):
            if hit():
                _die()
            return backward(self, *args, **kwargs)

        torch.Tensor.backward = killing_backward
    elif what == "log":
        from xmcl.runtime.log import JsonlLogger

        log = JsonlLogger.log

        def killing_log(self, record):
            log(self, record)
            if hit():
                _die()

        JsonlLogger.log = killing_log
    elif what == "save":
        save = torch.save

        def killing_save(obj, handle, *args, **kwargs):
            if hit():
                buffer = io.BytesIO()
                save(obj, buffer)
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()  # in the page cache, which a killed process does not take with it
                _die()
            return save(obj, handle, *args, **kwargs)

        torch.save = killing_save
    elif what == "before":
        module_name, _, name = target.rpartition(".")
        module = importlib.import_module(module_name)
        function = getattr(module, name)

        def killing_call(*args, **kwargs):
            if hit():
                _die()
            return function(*args, **kwargs)

        setattr(module, name, killing_call)
    else:
        raise SystemExit(f"unknown kill point {spec!r}")


def main(trainer: str, out: str, spec: str, overrides: list[str]) -> None:
    from xmcl.config import load_config

    spec, _, rank = spec.partition("@")
    if not rank or rank == os.environ.get("RANK", "0"):
        arm(spec)
    if trainer == "retrieval":
        from xmcl.retrieval.config import RetrievalTrainConfig
        from xmcl.training.retrieval_trainer import train_retrieval

        train_retrieval(load_config(RetrievalTrainConfig, None, overrides), out, progress=False)
    elif trainer == "distill":
        from xmcl.distill.config import DistillConfig
        from xmcl.training.distill_trainer import pretrain_distill

        pretrain_distill(load_config(DistillConfig, None, overrides), out, progress=False)
    elif trainer == "clip":
        from xmcl.retrieval.clip.config import ClipTrainConfig
        from xmcl.training.clip_trainer import train_clip

        train_clip(load_config(ClipTrainConfig, None, overrides), out, progress=False)
    else:
        raise SystemExit(f"unknown trainer {trainer!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
