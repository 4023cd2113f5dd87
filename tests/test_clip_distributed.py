"""train-clip data-parallel: 2 spawned gloo ranks on 127.0.0.1 with batch B each train the run that 1 process
trains with batch 2B (InfoNCE over the global batch: same losses, same weights to float tolerance, same best
epoch); only rank 0 writes; a resume with another world size is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.clip_trainer import train_clip

from helpers import PER_RANK, clip_config, free_port

def _rank(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_clip(clip_config(Path(data), PER_RANK), Path(out), progress=False)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_of_b_train_the_one_process_run_of_2b(tmp_path: Path) -> None:
    shapes = tmp_path / "shapes"
    generate_shapes_world(shapes, num_images=24, seed=0, image_size=64, progress=False)
    one, two = tmp_path / "one", tmp_path / "two"
    train_clip(clip_config(shapes, 2 * PER_RANK), one, progress=False)
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_rank, args=(free_port(), str(shapes), str(two)), nprocs=2, join=True,
                       start_method="spawn")
    expected, got = read_checkpoint(one / "last.pt"), read_checkpoint(two / "last.pt")
    assert got["world_size"] == 2 and got["global_step"] == expected["global_step"] >= 2
    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    losses = [(x["loss"], y["loss"]) for x, y in zip(a, b) if "loss" in x]
    assert [y for _, y in losses] == pytest.approx([x for x, _ in losses], rel=1e-5)
    assert got["best_epoch"] == expected["best_epoch"]
    assert got["best_rsum"] == pytest.approx(expected["best_rsum"], abs=1e-3)
    # The attention keys' bias adds the same number to every logit of a query (the softmax is shift-invariant): its
    # gradient is zero up to rounding, which AdamW turns into lr-sized steps, so it stays within steps * lr of its
    # zero start and drifts apart at that scale; every other tensor matches tightly.
    reach = expected["global_step"] * 2e-3
    for part in ("model", "loss"):
        for name, weights in expected[part].items():
            atol = reach if name.endswith("k_proj.bias") else 2e-5
            assert torch.allclose(got[part][name].float(), weights.float(), rtol=1e-4, atol=atol), (part, name)
    assert (two / "model.safetensors").is_file()

    with pytest.raises(CheckpointError, match="saved by a run of 2 process\\(es\\); this run has 1"):
        train_clip(clip_config(shapes, PER_RANK), two, progress=False)
