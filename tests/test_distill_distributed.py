"""ST-SLidR pretraining data-parallel: 2 spawned gloo ranks on 127.0.0.1 with one scene each and ``loss.gather:
global`` take the steps that 1 process takes with both scenes (same losses, same weights to float tolerance); with
the default ``local`` each rank contrasts its own superpixels (another loss); only rank 0 writes; a resume with
another world size is refused. ``gather_uneven`` (ranks with different superpixel counts) puts every rank's rows in
rank order and sends each rank the gradient of its own rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from xmcl.distill.networks import build_voxel_net
from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.distributed import close_world, gather_uneven, init_world
from xmcl.runtime.rng import seed_everything
from xmcl.training.distill_trainer import pretrain_distill

from helpers import distill_config, free_port

# SGD without momentum and warm-up: an update proportional to the gradient, so a scale error shows
STEPS = ["data.pretrain_scenes=2", "data.augment=false", "optim.steps=2", "optim.optimizer=sgd", "optim.lr=0.5",
         "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.warmup_steps=0", "run.threads=1"]


def _config(sp: Path, per_rank: int, *extra: str):
    return distill_config(f"superpixels.cache_dir={sp}", f"optim.batch_scenes={per_rank}", *STEPS, *extra)


def _rank(rank: int, ports: list[int], root: str) -> None:
    torch.set_num_threads(1)
    for port, gather in zip(ports, ("global", "local")):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        pretrain_distill(_config(Path(root) / "sp", 1, f"loss.gather={gather}"), Path(root) / gather,
                         progress=False)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_with_the_global_gather_take_the_one_process_steps(tmp_path: Path) -> None:
    one = tmp_path / "one"
    pretrain_distill(_config(tmp_path / "sp", 2, "loss.gather=global"), one, progress=False)
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_rank, args=([free_port(), free_port()], str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    expected, got = read_checkpoint(one / "last.pt"), read_checkpoint(tmp_path / "global" / "last.pt")
    assert got["world_size"] == 2 and got["global_step"] == expected["global_step"] == 2
    assert _losses(tmp_path / "global") == pytest.approx(_losses(one), rel=1e-5)
    for part in ("voxel_net", "image_head"):
        for name, weights in expected[part].items():
            assert torch.allclose(got[part][name].float(), weights.float(), rtol=1e-4, atol=1e-5), (part, name)
    seed_everything(0)
    start = build_voxel_net(_config(tmp_path / "sp", 2).voxel).state_dict()
    moved = [n for n, w in start.items() if w.is_floating_point() and not torch.equal(w, expected["voxel_net"][n])]
    assert len(moved) > len(start) // 2, "the steps hardly changed the network: the comparison would prove little"
    assert _losses(tmp_path / "local") != pytest.approx(_losses(one), rel=1e-3)  # per-rank negatives differ
    assert not any(p.name.startswith("rank") for p in (tmp_path / "global").iterdir())

    with pytest.raises(CheckpointError, match="saved by a run of 2 process\\(es\\); this run has 1"):
        pretrain_distill(_config(tmp_path / "sp", 1, "loss.gather=global"), tmp_path / "global", progress=False)


def _uneven_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    world = init_world(torch.device("cpu"), timeout_s=60)
    try:
        rows = torch.arange(3 + 2 * rank, dtype=torch.float32)[:, None].repeat(1, 2) + 10 * rank  # 3 and 5 rows
        rows.requires_grad_(True)
        gathered = gather_uneven(rows, world)
        weights = torch.arange(16, dtype=torch.float32).view(8, 2) * (rank + 1)  # another loss on each rank
        (gathered * weights).sum().backward()
        torch.save({"gathered": gathered.detach(), "grad": rows.grad,
                    "semantic": gather_uneven(rows.detach(), world, with_grad=False)}, Path(out) / f"{rank}.pt")
    finally:
        close_world(world)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gather_uneven_keeps_rank_order_and_sends_each_rank_its_rows_gradient(tmp_path: Path) -> None:
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_uneven_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.cat([torch.arange(3.0)[:, None].repeat(1, 2), torch.arange(5.0)[:, None].repeat(1, 2) + 10])
    for rank in ranks:
        assert torch.equal(rank["gathered"], expected) and torch.equal(rank["semantic"], expected)
    summed = torch.arange(16, dtype=torch.float32).view(8, 2) * 3  # d(sum of both ranks' losses) / d(rows)
    assert torch.equal(ranks[0]["grad"], summed[:3]) and torch.equal(ranks[1]["grad"], summed[3:])
