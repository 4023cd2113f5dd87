"""The retrieval trainer data-parallel: 2 spawned gloo ranks on 127.0.0.1 with per-rank batch B train the run that
1 process trains with batch 2B (same losses, same weights to float tolerance), only rank 0 writes, and a resume
with another world size is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from xmcl.config import config_to_dict
from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import PER_RANK, free_port, retrieval_config, write_corpus

def _worker(rank: int, port: int, corpus: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_retrieval(retrieval_config(Path(corpus), f"optim.batch_size={PER_RANK}", "optim.epochs=1", "run.threads=1"),
                    Path(out), progress=False)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_of_b_train_the_one_process_run_of_2b(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 6})
    one = tmp_path / "one"
    train_retrieval(retrieval_config(corpus, f"optim.batch_size={2 * PER_RANK}", "optim.epochs=1", "run.log_every=1"),
                    one, progress=False)
    two = tmp_path / "two"
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_worker, args=(free_port(), str(corpus), str(two)), nprocs=2, join=True,
                       start_method="spawn")
    expected, got = read_checkpoint(one / "last.pt"), read_checkpoint(two / "last.pt")
    assert got["world_size"] == 2 and got["global_step"] == expected["global_step"] == 5
    state = expected["model"]
    # A bias before a BatchNorm or a softmax (shift-invariant) has a zero gradient up to rounding, which AdamW turns
    # into lr-sized steps: such biases stay within steps * lr of their zero start and drift apart at that scale (and
    # so do the running means they shift); every other tensor matches tightly.
    steps, lr = 5, 1e-3
    noise = {name for name, w in state.items() if name.endswith(".bias") and w.abs().max() < steps * lr}
    moved = 0
    for name, weights in state.items():
        loose = name in noise or name.endswith("running_mean")
        assert torch.allclose(got["model"][name].float(), weights.float(), rtol=1e-4,
                              atol=2e-3 if loose else 2e-5), name
        moved += name.endswith("_queue.keys") and bool(weights.abs().sum() > 0)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5, abs=1e-6)
    assert moved, "no queue was filled: the comparison would not cover the gathered keys"
    assert got["best_rsum"] == pytest.approx(expected["best_rsum"], abs=1e-3)
    assert len(noise) < len(state) // 4 and len(_losses(one)) == 5
    assert len((two / "log.jsonl").read_text().splitlines()) == len((one / "log.jsonl").read_text().splitlines())

    with pytest.raises(CheckpointError, match="saved by a run of 2 process\\(es\\); this run has 1"):
        train_retrieval(retrieval_config(corpus, f"optim.batch_size={PER_RANK}", "optim.epochs=2", "run.threads=1"),
                        two, progress=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_torchrun_nodes_on_one_machine_train_the_two_rank_run(tmp_path: Path) -> None:
    """Two ``torchrun --nnodes 2 --node_rank {0,1}`` launches (c10d rendezvous on 127.0.0.1) of ``python -m xmcl
    train``, one rank each, train the run that 2 spawned ranks on one node train, bit for bit."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 6})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(retrieval_config(
        corpus, f"optim.batch_size={PER_RANK}", "optim.epochs=1", "run.threads=1", "run.progress=false"))))
    spawned = tmp_path / "spawned"
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_worker, args=(free_port(), str(corpus), str(spawned)), nprocs=2, join=True,
                       start_method="spawn")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    port, nodes = free_port(), tmp_path / "nodes"
    launches = [subprocess.Popen(
        [str(torchrun), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "xmcl", "train",
         "--config", str(config), "--out", str(nodes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(2)]
    outputs = [launch.communicate(timeout=240)[0].decode() for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    expected, got = read_checkpoint(spawned / "last.pt"), read_checkpoint(nodes / "last.pt")
    assert got["world_size"] == 2 and got["global_step"] == expected["global_step"] == 5
    for name, weights in expected["model"].items():
        assert torch.equal(got["model"][name], weights), name
