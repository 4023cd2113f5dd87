"""Atomic checkpoints and RNG capture: a failed write keeps the old file; restored RNG replays the same draws."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import load_checkpoint, save_checkpoint
from xmcl.runtime.log import JsonlLogger, plot_curves, read_jsonl
from xmcl.runtime.rng import capture_rng_state, restore_rng_state


def test_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.arange(5.0), "step": 3, "nested": {"name": "x"}}
    save_checkpoint(tmp_path / "a" / "ckpt.pt", "test.kind", 2, state)
    loaded = load_checkpoint(tmp_path / "a" / "ckpt.pt", "test.kind", 2)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["nested"] == {"name": "x"}
    assert (loaded["kind"], loaded["version"]) == ("test.kind", 2)


def test_other_kinds_versions_and_old_formats_are_refused_by_name(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.pt", "test.kind", 1, {"step": 1})
    with pytest.raises(CheckpointError, match="a.pt is test.kind version 1; this xmcl reads version 2"):
        load_checkpoint(tmp_path / "a.pt", "test.kind", 2)
    with pytest.raises(CheckpointError, match="'test.kind' checkpoint, not 'other.kind'"):
        load_checkpoint(tmp_path / "a.pt", "other.kind", 1)
    torch.save({"format": "xmcl.retrieval/1", "model": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="earlier xmcl format \\(format 'xmcl.retrieval/1'\\)"):
        load_checkpoint(tmp_path / "old.pt", "xmcl.retrieval", 2)


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "test.kind", 1, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, "test.kind", 1, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path, "test.kind", 1)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_and_corrupt_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", "test.kind", 1)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path, "test.kind", 1)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt", "test.kind", 1)


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
