"""Faults of a data-parallel run end the job in bounded time instead of hanging it:

- a refusal at the start on rank 0 (its folder locked by another process, ``--no-resume`` into a used folder, a
  resume with a changed config; for ``train``, ``train-clip`` and ``distill pretrain``) makes every rank fail at
  once with rank 0's message, not wait at a collective until its 600 s timeout; the command's summary line is
  printed once per job, by rank 0;
- two torchrun "nodes" on one machine (c10d rendezvous on 127.0.0.1), one rank killed by SIGKILL mid-training:
  both launches end within seconds, and rerunning both resumes ``last.pt`` and finishes with the same world size,
  on the weights an uninterrupted run of the same world ends on.

Every process here talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from xmcl.config import config_to_dict
from xmcl.data.shapes import generate_shapes_world
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.lock import RunLock
from xmcl.training.clip_trainer import train_clip
from xmcl.training.distill_trainer import pretrain_distill
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import (PER_RANK, clip_config, distill_config, free_port, log_without_timing, retrieval_config,
                     write_corpus)

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path]), "OMP_NUM_THREADS": "1"}
RUN = ["run.threads=1", "run.progress=false", "run.device=cpu"]
# (trainer, folder, resume, extra overrides) of each refusal; ``locked`` is held by the test process
REFUSALS = {"locked": ("retrieval", "locked", True, []), "no_resume": ("retrieval", "used", False, []),
            "changed_config": ("retrieval", "used", True, ["optim.lr=2e-3"]),
            "distill_locked": ("distill", "locked", True, []), "clip_no_resume": ("clip", "used_clip", False, [])}


def _run(trainer: str, root: Path, folder: str, resume: bool, extra: list[str]) -> None:
    """A tiny run of ``trainer`` (retrieval: the corpus in ``root``; clip: ``root/shapes``) into ``root/folder``."""
    if trainer == "retrieval":
        cfg = retrieval_config(root, f"optim.batch_size={PER_RANK}", "optim.epochs=1", *RUN, *extra)
        train_retrieval(cfg, root / folder, resume=resume, progress=False)
    elif trainer == "distill":
        cfg = distill_config(f"superpixels.cache_dir={root / 'sp'}", "optim.steps=1", "optim.batch_scenes=1",
                             *RUN, *extra)
        pretrain_distill(cfg, root / folder, resume=resume, progress=False)
    else:
        train_clip(clip_config(root / "shapes", PER_RANK, epochs=1), root / folder, resume=resume, progress=False)


def _refusing_rank(rank: int, ports: dict[str, int], root: str) -> None:
    """Each refusal in turn (a fresh process group each); what every call raised, and how long it took, into
    ``root/rank{rank}.json``."""
    torch.set_num_threads(1)
    outcomes = {}
    for case, (trainer, folder, resume, extra) in REFUSALS.items():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[case]), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        began = time.monotonic()
        try:
            _run(trainer, Path(root), folder, resume, extra)
            outcomes[case] = ["none", "", time.monotonic() - began]
        except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
            outcomes[case] = [type(error).__name__, str(error), time.monotonic() - began]
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(outcomes))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_refusal_on_rank_0_ends_every_rank_at_once_with_its_message(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"train": 16, "val": 6})
    generate_shapes_world(tmp_path / "shapes", num_images=12, seed=0, image_size=64, progress=False)
    _run("retrieval", tmp_path, "used", True, [])
    _run("clip", tmp_path, "used_clip", True, [])
    ports = {case: free_port() for case in REFUSALS}
    os.environ.pop("WORLD_SIZE", None)
    context = mp.get_context("spawn")
    with RunLock(tmp_path / "locked"):
        ranks = [context.Process(target=_refusing_rank, args=(rank, ports, str(tmp_path)))
                 for rank in range(2)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=180)
        for process in ranks:
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in ranks] == [0, 0]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    expected = {"locked": ("RunFolderError", "is in use"), "no_resume": ("RunFolderError", "already holds a run"),
                "changed_config": ("CheckpointError", "optim.lr: 0.001 -> 0.002"),
                "distill_locked": ("RunFolderError", "is in use"), "clip_no_resume": ("RunFolderError", "already holds")}
    for case, (kind, words) in expected.items():
        main, other = outcomes[0][case], outcomes[1][case]
        assert main[0] == kind and words in main[1], (case, main)
        assert other[:2] == main[:2], case  # the same error, with rank 0's message
        assert other[2] < 60, (case, other)  # at once, not at the collectives' 600 s timeout
    assert not (tmp_path / "locked" / "config.yaml").exists()


def _torchrun(node: int, nodes: int, per_node: int, port: int, args: list[str]) -> subprocess.Popen:
    """One torchrun launch: ``per_node`` ranks on node ``node`` of ``nodes``, c10d rendezvous on
    127.0.0.1:``port``, no restarts."""
    return subprocess.Popen(
        [str(TORCHRUN), "--nnodes", str(nodes), "--node_rank", str(node), "--nproc_per_node", str(per_node),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}",
         "--max-restarts", "0", "--monitor-interval", "0.5", *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(launches: list[subprocess.Popen], timeout: float) -> tuple[list[int], list[str], float]:
    """Wait (at most ``timeout`` s in all) for every launch; their exit statuses, outputs and the seconds taken.
    A launch still running then is killed, and the test fails on its status."""
    began, outputs = time.monotonic(), []
    for launch in launches:
        try:
            outputs.append(launch.communicate(timeout=max(1.0, timeout - (time.monotonic() - began)))[0])
        except subprocess.TimeoutExpired:
            launch.kill()
            outputs.append(launch.communicate()[0] + "\n[killed by the test: still running]")
    return [launch.returncode for launch in launches], outputs, time.monotonic() - began


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_summary_line_is_printed_once_per_job(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, {"train": 16, "val": 6})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(retrieval_config(
        corpus, f"optim.batch_size={PER_RANK}", "optim.epochs=1", *RUN))))
    codes, outputs, _ = _finish([_torchrun(0, 1, 2, free_port(), [
        "-m", "xmcl", "train", "--config", str(config), "--out", str(tmp_path / "run")])], timeout=180)
    assert codes == [0], outputs
    assert outputs[0].count("best val rSum") == 1, outputs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_killed_mid_training_ends_both_nodes_and_a_rerun_resumes(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, {"train": 12, "val": 6})
    overrides = [f"data.path={corpus}", "data.val_split=val", "model.embed_dim=16", "model.region_dim=12",
                 "model.text_encoder=bigru", "model.word_dim=8", "model.queue_size=10", "model.sge_dropout=0.0",
                 "optim.epochs=2", f"optim.batch_size={PER_RANK}", "optim.lr=1e-3", "optim.lr_decay_epochs=[1]",
                 *RUN, "run.checkpoint_every=1"]  # 24 captions: 3 global batches of 8 an epoch

    def nodes(out: Path, kill: str) -> list[subprocess.Popen]:
        port = free_port()
        return [_torchrun(node, 2, 1, port, [str(TESTS / "kill_driver.py"), "retrieval", str(out), kill, *overrides])
                for node in range(2)]

    codes, outputs, _ = _finish(nodes(tmp_path / "straight", "none"), timeout=120)
    assert codes == [0, 0], outputs
    killed = tmp_path / "killed"
    codes, outputs, seconds = _finish(nodes(killed, "backward:5@1"), timeout=90)  # rank 1, in epoch 2's step 2
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert seconds < 60, (seconds, outputs)
    print(f"both nodes ended {seconds:.1f} s after the start of the killed launch")
    stopped = read_checkpoint(killed / "last.pt")
    assert stopped["global_step"] == 4 and stopped["world_size"] == 2

    codes, outputs, _ = _finish(nodes(killed, "none"), timeout=120)
    assert codes == [0, 0], outputs
    assert log_without_timing(killed) == log_without_timing(tmp_path / "straight")  # each record once
    expected, got = read_checkpoint(tmp_path / "straight" / "last.pt"), read_checkpoint(killed / "last.pt")
    assert got["world_size"] == 2 and got["global_step"] == expected["global_step"] == 6
    for name, weights in expected["model"].items():
        assert torch.equal(got["model"][name], weights), name
