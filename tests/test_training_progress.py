"""The progress record every loop saves whole and restores whole, and the notes a resumed run prints."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.distributed import SINGLE_PROCESS
from xmcl.runtime.log import read_jsonl
from xmcl.training.progress import PendingLosses, TrainingProgress
from xmcl.training.retrieval_trainer import train_retrieval
from xmcl.training.run import Checkpointer, RunFolder, announce_finished

from helpers import retrieval_config, write_corpus


def test_steps_and_epochs_keep_the_sums_and_the_best() -> None:
    progress = TrainingProgress()
    for loss in (3.0, 1.0):
        progress.add_step()
        progress.add_losses(loss, 1)
    assert (progress.step_in_epoch, progress.global_step) == (2, 2)
    assert progress.end_epoch(10.0, {"rsum": 10.0}) == (2.0, True)
    progress.add_step()
    progress.add_losses(5.0, 1)
    assert progress.end_epoch(9.0) == (5.0, False)  # worse: the best stays epoch 1's
    assert progress.end_epoch(9.5) == (None, False)  # an epoch without steps has no mean
    assert (progress.epoch, progress.step_in_epoch, progress.global_step) == (3, 0, 3)
    assert (progress.best_rsum, progress.best_epoch, progress.best_metrics) == (10.0, 1, {"rsum": 10.0})
    assert progress.position() == "epoch 4, step 0 (global step 3)"


def test_the_record_comes_back_whole_and_its_time_adds_up_at_each_lap() -> None:
    progress = TrainingProgress(epoch=2, step_in_epoch=3, global_step=13, best_rsum=50.0, best_epoch=1,
                                epoch_loss_sum=1.5, epoch_loss_count=3, train_seconds=7.0)
    progress.lap()  # no clock started: nothing to add
    assert progress.train_seconds == 7.0
    progress.start_clock()
    time.sleep(0.01)
    progress.lap()
    first = progress.train_seconds
    time.sleep(0.01)
    progress.lap()
    assert 7.01 <= first < progress.train_seconds
    state = progress.state_dict()
    assert set(state) == {"epoch", "step_in_epoch", "global_step", "best_rsum", "best_epoch", "best_metrics",
                          "epoch_loss_sum", "epoch_loss_count", "train_seconds"}
    restored = TrainingProgress()
    restored.load_state_dict(state)
    assert restored == TrainingProgress(**state)


def test_an_older_checkpoint_lacks_the_time_and_a_broken_one_is_named(tmp_path: Path) -> None:
    state = TrainingProgress(epoch=1, best_metrics={"rsum": 3.0}).state_dict()
    older = {k: v for k, v in state.items() if k not in ("train_seconds", "best_metrics")}
    progress = TrainingProgress()
    progress.load_state_dict(older)
    progress.start_clock()
    progress.lap()
    assert progress.epoch == 1 and progress.best_metrics is None and math.isnan(progress.train_seconds)
    broken = {k: v for k, v in state.items() if k != "global_step"}
    with pytest.raises(CheckpointError, match=r"x/last\.pt has no 'global_step' entry"):
        TrainingProgress().load_state_dict(broken, "x/last.pt")


@pytest.mark.parametrize("resumable,hint", [(("optim.epochs",), "Set a larger optim.epochs to train longer, or pass"),
                                            ((), "nothing to do. Pass --no-resume --overwrite")])
def test_a_finished_run_suggests_a_longer_run_only_where_the_length_may_change(
        tmp_path: Path, capsys: pytest.CaptureFixture, resumable: tuple[str, ...], hint: str) -> None:
    checkpointer = Checkpointer(RunFolder(tmp_path), "test.kind", 1, resumable=resumable)
    announce_finished(checkpointer, "2 of 2 epochs done", "optim.epochs", verbose=True)
    err = capsys.readouterr().err
    assert f"{tmp_path} already finished: 2 of 2 epochs done; nothing to do." in err and hint in err


def test_pending_losses_sum_on_the_device_and_read_once() -> None:
    pending = PendingLosses(SINGLE_PROCESS, torch.device("cpu"))
    values = [torch.tensor(0.1, dtype=torch.float32), torch.tensor(2.5), torch.tensor(-0.3)]
    for value in values:
        pending.add(value * 1)
    last, total, count = pending.read()
    assert (last, count) == (float(values[-1]), 3)
    assert total == sum(float(v) for v in values)  # float64 sums of the float32 losses, as the host did
    assert pending.read() == (0.0, 0.0, 0)


def test_the_log_cadence_changes_what_is_read_not_what_is_trained(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 24, "val": 6})
    every = train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.log_every=1"), tmp_path / "every",
                            progress=False)
    sparse = train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.log_every=2"), tmp_path / "sparse",
                             progress=False)
    steps = [r for r in read_jsonl(tmp_path / "every" / "log.jsonl") if "loss" in r]
    logged = [r for r in read_jsonl(tmp_path / "sparse" / "log.jsonl") if "loss" in r]
    assert len(steps) >= 4 and [r["step"] for r in logged] == [r["step"] for r in steps if r["step"] % 2 == 0]
    assert [r["loss"] for r in logged] == [r["loss"] for r in steps if r["step"] % 2 == 0]
    means = [[r["train_loss_mean"] for r in read_jsonl(tmp_path / name / "log.jsonl") if "train_loss_mean" in r]
             for name in ("every", "sparse")]
    assert means[0] == [pytest.approx(sum(r["loss"] for r in steps) / len(steps), rel=1e-12)]
    assert means[1] == [pytest.approx(means[0][0], rel=1e-12)]
    a, b = read_checkpoint(every["last"])["model"], read_checkpoint(sparse["last"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_curves_are_redrawn_within_their_share_of_the_run_and_always_at_the_end(tmp_path: Path,
                                                                               monkeypatch) -> None:
    import xmcl.training.run as run

    clock = {"now": 1000.0}
    drawn: list[float] = []

    def draw(log: Path, png: Path) -> None:  # each drawing takes 2 s of the fake clock
        drawn.append(clock["now"])
        clock["now"] += 2.0

    monkeypatch.setattr(run.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(run, "plot_curves", draw)
    logger = run.StepLogger(RunFolder(tmp_path), progress=False)
    for _ in range(12):  # twelve 45 s epochs, each ending with a plot
        clock["now"] += 45.0
        logger.plot()
    logger.plot(final=True)
    # a drawing happens while (time drawn so far + 2 s) <= 2% of the time since the start, and always the first
    expected, spent, now = [], None, 1000.0
    for _ in range(12):
        now += 45.0
        if spent is None or spent + 2.0 <= run.PLOT_SHARE * (now - 1000.0):
            expected.append(now)
            spent = (spent or 0.0) + 2.0
            now += 2.0
    assert drawn[:-1] == expected and [round((t - 1000.0) // 45) for t in expected] == [1, 5, 7, 9, 11]
    assert drawn[-1] == now  # the final drawing, however recent the last
    skipped = RunFolder(tmp_path / "other")
    quiet = run.StepLogger(skipped, progress=False, writes=False)
    quiet.plot(final=True)
    assert len(drawn) == len(expected) + 1  # a rank that does not write draws nothing
