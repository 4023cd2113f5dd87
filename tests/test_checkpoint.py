"""Atomic checkpoints and RNG capture: a failed write keeps the old file; restored RNG replays the same draws."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.errors import CheckpointError
from xmcl.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from xmcl.training.logging import JsonlLogger, plot_curves, read_jsonl


def test_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.arange(5.0), "step": 3, "nested": {"name": "x"}}
    save_checkpoint(tmp_path / "a" / "ckpt.pt", state)
    loaded = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["nested"] == {"name": "x"}


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_and_corrupt_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_rng_state_replays_draws() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_jsonl_log_survives_torn_line_and_plots(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(4):
        log.log({"step": step, "loss": 1.0 / (step + 1)})
    with (tmp_path / "log.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [0, 1, 2, 3]
    png = plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
