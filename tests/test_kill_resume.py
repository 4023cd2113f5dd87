"""kill -9 at any point, then resume: the final weights are bit for bit those of an uninterrupted run, and the log
is the uninterrupted run's log (no step twice, steps in order), for the retrieval trainer (dropout and caption
augmentation on, the defaults), distillation pretraining and train-clip.

Each run is a real process (``kill_driver.py``) that SIGKILLs itself at a chosen point: mid-step, between a log
record and the checkpoint that follows it, halfway through writing a checkpoint file, or between ``last.pt`` and
the best model. The straight run is a process of its own too, so both sides run under the same conditions (one
thread, CPU).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmcl.data.shapes import generate_shapes_world
from xmcl.runtime.checkpoint import read_checkpoint

from helpers import log_without_timing, write_corpus

pytestmark = pytest.mark.slow  # minutes of training, subprocesses or a browser: `make test-fast` leaves it out

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

RETRIEVAL = ["data.val_split=val", "model.embed_dim=16", "model.region_dim=12", "model.text_encoder=bigru",
             "model.word_dim=8", "model.queue_size=10", "model.sge_dropout=0.4", "data.augment_captions=true",
             "optim.epochs=2", "optim.batch_size=8", "optim.lr=1e-3", "optim.lr_decay_epochs=[1]"]
DISTILL = ["data.pretrain_scenes=3", "data.num_points=1500", "data.image_size=[32,64]", "voxel.widths=[4,8]",
           "voxel.out_dim=8", "voxel.voxel_size=0.2", "image.backbone=resnet18", "image.weights=null",
           "image.resnet_width=8", "superpixels.n_segments=12", "optim.steps=6", "optim.batch_scenes=2"]
CLIP = ["optim.epochs=2", "optim.batch_size=4", "optim.lr=2e-3", "optim.warmup_fraction=0.0", "model.image_size=32",
        "model.patch_size=8", "model.width=32", "model.layers=1", "model.heads=1", "model.embed_dim=8",
        "model.context_length=24"]
RUN = ["run.device=cpu", "run.threads=1", "run.progress=false", "run.checkpoint_every=2", "run.log_every=1"]

# The kill points of one chain of processes, each resuming what the previous one left (see kill_driver.py).
KILLS = {
    # 5 steps an epoch: killed in step 4 (last.pt at step 2); after the epoch's log record (last.pt at step 4);
    # halfway through best.pt, right after the epoch-end last.pt
    "retrieval": ["backward:4", "log:4", "save:2"],
    # killed in step 3; after step 4's log record, before its checkpoint; halfway through the final checkpoint
    "distill": ["backward:3", "log:2", "save:2"],
    # 3 steps an epoch: killed in step 2, before any checkpoint; after the epoch's log record; after the epoch-end
    # last.pt, before the best model is saved
    "clip": ["backward:2", "log:4", "before:xmcl.training.clip_trainer.save_clip:1"],
}
STATES = {"retrieval": ("model",), "distill": ("voxel_net", "image_head"), "clip": ("model", "loss")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The overrides of each trainer's tiny run, data included."""
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 6})
    generate_shapes_world(root / "shapes", num_images=20, seed=0, image_size=64, progress=False)
    return {"retrieval": [f"data.path={corpus}", *RETRIEVAL, *RUN],
            "distill": [f"superpixels.cache_dir={root / 'superpixels'}", *DISTILL, *RUN],
            "clip": [f"data.path={root / 'shapes'}", *CLIP, *RUN]}


def drive(trainer: str, out: Path, kill: str, overrides: list[str]) -> int:
    """Run ``kill_driver.py`` to its end or its kill point; its exit status (-9 when it was killed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(TESTS / "kill_driver.py"), trainer, str(out), kill, *overrides],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    return result.returncode


@pytest.mark.parametrize("trainer", sorted(KILLS))
def test_kill_9_anywhere_then_resume_is_bit_exact(trainer: str, data: dict[str, list[str]], tmp_path: Path) -> None:
    overrides = data[trainer]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert drive(trainer, straight, "none", overrides) == 0
    for kill in KILLS[trainer]:
        assert drive(trainer, killed, kill, overrides) == -signal.SIGKILL, f"{kill} was never reached"
    assert drive(trainer, killed, "none", overrides) == 0

    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(killed / "last.pt")
    for name in STATES[trainer]:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    if trainer == "retrieval":  # best.pt: its write was killed halfway; the resume rewrote it
        best_a, best_b = read_checkpoint(straight / "best.pt")["model"], read_checkpoint(killed / "best.pt")["model"]
        assert all(torch.equal(best_a[key], best_b[key]) for key in best_a)
    if trainer == "clip":  # the best model: its save never started; the resume saved it
        assert (straight / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()

    log = log_without_timing(killed)
    assert log == log_without_timing(straight)  # every record once, in order, with the same values
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))
    leftovers = [p.name for p in killed.rglob("*") if ".xmcl-" in p.name or p.name == ".xmcl.lock"]
    assert leftovers == []  # killed writes' temporaries were cleared, and the lock was released
