"""Atomic checkpoints and RNG capture: a failed write keeps the old file; restored RNG replays the same draws."""

import os
import random
import resource
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import load_checkpoint, save_checkpoint
from xmcl.runtime.log import JsonlLogger, plot_curves, read_jsonl
from xmcl.runtime.rng import TorchStream, capture_rng_state, restore_rng_state


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


def test_a_payload_a_safe_load_would_refuse_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "test.kind", 1, {"step": 1})
    with pytest.raises(TypeError, match=r"payload\.rng\.numpy is a numpy\.ndarray"):
        save_checkpoint(path, "test.kind", 1, {"step": 2, "rng": {"numpy": np.zeros(3)}})
    assert load_checkpoint(path, "test.kind", 1)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_failed_write_names_the_path_and_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A real write failure (the file-size limit, as a full disk would): one line naming the file, the old file
    intact, no temporary left behind."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "test.kind", 1, {"step": 1})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*ckpt\.pt: File too large; the "
                                                  r"previous ckpt\.pt is kept"):
            save_checkpoint(path, "test.kind", 1, {"step": 2, "weights": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert load_checkpoint(path, "test.kind", 1)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "a.pt", "test.kind", 1, {"step": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640  # 0o666 less 0o027, as open() would give


def test_old_version_refused_by_safe_load_names_its_version(tmp_path: Path) -> None:
    """A file of the format before safe loading (numpy RNG state inside) is refused naming its version, not with
    the unpickler's message."""
    torch.save({"kind": "test.kind", "version": 1, "rng": np.random.get_state()}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old\.pt is test\.kind version 1, .*this xmcl reads version 2"):
        load_checkpoint(tmp_path / "old.pt", "test.kind", 2)


def test_missing_and_corrupt_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", "test.kind", 1)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path, "test.kind", 1)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt", "test.kind", 1)


def test_rng_state_replays_draws_after_a_safe_round_trip(tmp_path: Path) -> None:
    """The captured state survives a checkpoint (a safe load) and replays the same draws of every generator."""
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", "test.kind", 1, {"rng": capture_rng_state()})
    first = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt", "test.kind", 1)["rng"])
    second = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


def test_torch_stream_is_independent_of_the_global_generator() -> None:
    """Draws inside the stream continue the stream whatever the global generator did in between, and leave the
    global generator as it was; a stream restored from its state dict replays the same draws."""
    stream = TorchStream(5)
    with stream.active():
        a = torch.rand(3)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in stream.state_dict().items()}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with stream.active():
        b = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)  # the global generator moves on; the stream does not notice
    replay = TorchStream(99)
    replay.load_state_dict(saved)
    with replay.active():
        assert torch.equal(torch.rand(3), b)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        assert torch.equal(torch.rand(6), torch.cat([a, b]))  # the stream is torch's sequence for its seed


def test_jsonl_log_survives_torn_line_and_plots(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(4):
        log.log({"step": step, "loss": 1.0 / (step + 1)})
    with (tmp_path / "log.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [0, 1, 2, 3]
    png = plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
