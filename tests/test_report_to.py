"""``run.report_to: [tensorboard]``: refused with a clear message where the package is not importable; otherwise
every log record's numbers go to TensorBoard scalars at the record's step, and a resume purges the events after
the resumed step (the writer is a stand-in here: the tensorboard package is not installed in the test venv)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from xmcl.errors import ConfigError
from xmcl.runtime.run_config import RunConfig
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import retrieval_config, write_corpus


def test_tensorboard_is_refused_where_the_package_is_not_importable(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    with pytest.raises(ConfigError, match="run.report_to: tensorboard needs the tensorboard package"):
        RunConfig(report_to=["tensorboard"])
    assert RunConfig().report_to == []


class _Writer:
    """Records what a ``SummaryWriter`` is given."""

    made: list["_Writer"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.flushes = log_dir, purge_step, [], 0
        _Writer.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.slow
def test_log_records_go_to_tensorboard_and_a_resume_purges_what_follows(tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else real(name))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_Writer))
    _Writer.made.clear()
    corpus = write_corpus(tmp_path, {"train": 12, "val": 6})
    out = tmp_path / "run"
    train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.report_to=[tensorboard]", "run.threads=1"), out,
                    progress=False)
    first = _Writer.made[0]
    assert first.log_dir == str(out / "tensorboard") and first.purge_step is None and first.flushes >= 1
    losses = [(step, value) for tag, value, step in first.scalars if tag == "loss"]
    assert [step for step, _ in losses] == [1, 2, 3]  # 24 captions, batches of 8
    assert {"val_rsum", "train_loss_mean", "lr"} <= {tag for tag, _, _ in first.scalars}

    train_retrieval(retrieval_config(corpus, "optim.epochs=2", "run.report_to=[tensorboard]", "run.threads=1"), out,
                    progress=False)
    second = _Writer.made[1]
    assert second.purge_step == 4 and [s for t, _, s in second.scalars if t == "loss"] == [4, 5, 6]
