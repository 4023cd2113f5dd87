"""One writer per run folder, and a run folder that tells the truth: the lock (two processes, stale lock of a dead
one), --no-resume needs --overwrite, a resume refuses changed settings and says where it resumes, a finished run
says so, SIGINT checkpoints and says how to resume, bad states and paths fail in one line before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from xmcl.errors import CheckpointError, ConfigError, RunFolderError, RunInterrupted
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.runtime.checkpoint import read_checkpoint, save_checkpoint
from xmcl.runtime.lock import LOCK_NAME, RunLock
from xmcl.runtime.log import read_jsonl
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import retrieval_config, write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"
HOLD = """
import sys, time
from xmcl.runtime.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    return write_corpus(root, {"train": 20, "val": 6})


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that takes the folder's lock and keeps it (until killed, or 60 s)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(corpus: Path,
                                                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        began = time.monotonic()
        with pytest.raises(RunFolderError, match=rf"run folder {run} is in use by pid {holder.pid} on host \S+"):
            train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
        assert time.monotonic() - began < 30  # at once: it does not wait for the holder
        assert not (run / "last.pt").exists() and not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the holder cannot release anything
        holder.wait(timeout=30)
    assert (run / LOCK_NAME).exists()  # left behind by the dead holder
    with RunLock(run) as lock:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == holder.pid
    assert not (run / LOCK_NAME).exists()


def test_two_runs_in_one_process_are_refused_too(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()


def test_a_failed_start_leaves_no_empty_folder_and_names_data_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data\.path = '.*nowhere' does not exist"):
        train_retrieval(retrieval_config(tmp_path / "nowhere"), run, progress=False)
    assert not run.exists()


def test_no_resume_into_a_run_needs_overwrite(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
    best, log = (run / "best.pt").read_bytes(), (run / "log.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match=r"already holds a run \(config\.yaml, last\.pt, best\.pt, log\.jsonl, "
                                             r"curves\.png\); --no-resume would start over.*--overwrite"):
        train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.seed=3"), run, resume=False, progress=False)
    assert (run / "best.pt").read_bytes() == best and (run / "log.jsonl").read_bytes() == log

    train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.seed=3"), run, resume=False, overwrite=True,
                    progress=False)
    assert read_checkpoint(run / "last.pt")["config"]["run"]["seed"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == 3
    assert [r["epoch"] for r in read_jsonl(run / "log.jsonl") if "val_rsum" in r] == [1]  # the old log is gone


def test_resume_refuses_changed_settings_and_config_yaml_tells_the_truth(corpus: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    first = train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
    first_seconds = read_checkpoint(run / "last.pt")["train_seconds"]
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.001 -> 0\.002; run\.seed: 0 -> 4\); only .*"
                                              r"optim\.epochs.* may change on resume"):
        train_retrieval(retrieval_config(corpus, "optim.epochs=1", "optim.lr=2e-3", "run.seed=4"), run, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-3

    train_retrieval(retrieval_config(corpus, "optim.epochs=2"), run)  # more epochs: a declared resumable key
    err = capsys.readouterr().err
    assert f"resuming {run / 'last.pt'} from epoch 2, step 0 (global step 5)" in err
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written == read_checkpoint(run / "last.pt")["config"] and written["optim"]["epochs"] == 2

    last, log = (run / "last.pt").read_bytes(), (run / "log.jsonl").read_bytes()
    summary = train_retrieval(retrieval_config(corpus, "optim.epochs=2"), run)
    err = capsys.readouterr().err
    assert f"{run} already finished: 2 of 2 epochs done" in err and "Set a larger optim.epochs to train longer" in err
    assert (run / "last.pt").read_bytes() == last and (run / "log.jsonl").read_bytes() == log
    assert summary["best_rsum"] == read_checkpoint(run / "last.pt")["best_rsum"]
    logged = [r for r in read_jsonl(run / "log.jsonl") if "val_rsum" in r]
    assert summary["val_rsum_by_epoch"] == {r["epoch"]: r["val_rsum"] for r in logged} and len(logged) == 2
    assert first["val_rsum_by_epoch"] == {1: logged[0]["val_rsum"]}
    assert 0 < first_seconds == first["train_seconds"]  # the loop's time up to its last checkpoint
    assert first_seconds < summary["train_seconds"] == read_checkpoint(run / "last.pt")["train_seconds"]


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_the_resume_is_exact(corpus: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in step 3 of epoch 1: the step finishes, last.pt holds it, the message says how to resume, and the
    resumed run ends with the uninterrupted run's weights."""
    cfg = retrieval_config(corpus, "model.sge_dropout=0.4")
    straight = train_retrieval(cfg, tmp_path / "straight", progress=False)
    clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def interrupt_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_in_step_three)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGINT at epoch 1, step 3; .*last\.pt: run the same "
                                             r"command again to resume"):
        train_retrieval(cfg, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert signal.getsignal(signal.SIGINT) is handler  # the run put the handler back
    state = read_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    resumed = train_retrieval(cfg, tmp_path / "stopped", progress=False)
    a, b = read_checkpoint(straight["last"])["model"], read_checkpoint(resumed["last"])["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert RunInterrupted.exit_code == 130


def test_a_state_that_does_not_fit_is_one_line_on_resume_and_on_evaluate(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
    for name in ("last.pt", "best.pt"):
        state = read_checkpoint(run / name)
        key = next(k for k in state["model"] if k.endswith("weight"))
        del state["model"][key]
        save_checkpoint(run / name, state.pop("kind"), state.pop("version"), state)
    with pytest.raises(CheckpointError, match=rf"checkpoint {run / 'last.pt'}: its 'model' state does not fit "
                                              rf"this run: .*Missing key"):
        train_retrieval(retrieval_config(corpus, "optim.epochs=2"), run, progress=False)
    with pytest.raises(CheckpointError, match=r"best\.pt: the weights do not fit the model its config describes"):
        evaluate_checkpoint(run / "best.pt", None, "val", ("all",), device="cpu")


def test_an_out_folder_that_is_a_file_is_refused_before_any_work(corpus: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match=rf"run folder {blocker} is a file, not a folder"):
        train_retrieval(retrieval_config(corpus), blocker, progress=False)
    with pytest.raises(RunFolderError, match=rf"run folder {blocker / 'run'} cannot be created: {blocker} is a file"):
        train_retrieval(retrieval_config(corpus), blocker / "run", progress=False)


def test_a_run_saved_under_old_key_names_resumes(corpus: Path, tmp_path: Path) -> None:
    """A checkpoint whose config uses keys renamed since (``loss.lambda_batch``, ``model.key_encoders_eval``) resumes
    under today's names: the saved config is read through the same renames before it is compared."""
    run = tmp_path / "run"
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
    state = read_checkpoint(run / "last.pt")
    state["config"]["loss"]["lambda_batch"] = state["config"]["loss"].pop("batch_weight")
    state["config"]["model"].update(key_modes="switch", key_encoders_eval=True)
    kind, version = state.pop("kind"), state.pop("version")
    save_checkpoint(run / "last.pt", kind, version, state)
    summary = train_retrieval(retrieval_config(corpus, "optim.epochs=2"), run, progress=False)
    assert summary["best_epoch"] >= 1 and read_checkpoint(run / "last.pt")["epoch"] == 2
    with pytest.raises(CheckpointError, match=r"loss\.batch_weight: 1\.0 -> 2\.0"):
        train_retrieval(retrieval_config(corpus, "optim.epochs=2", "loss.batch_weight=2.0"), run, progress=False)
