"""Data parallel on gloo (DistributedDataParallel): one step of a 2-process run with B pairs per rank equals a
1-process step with the 2B pairs (loss, parameter update, queues), for InfoNCE, the hinge (both modes) and UTO, all
with momentum queues, and for semantically tolerant UTO and InfoNCE (semantic vectors gathered, the semantic queue).

Workers run in fresh processes (``torch.multiprocessing`` spawn) on 127.0.0.1 with a 60 s collective timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from xmcl.config import load_config
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.distributed import SINGLE_PROCESS, close_world, data_parallel, init_world

from helpers import free_port

PAIRS, REGIONS, DIM, TOKENS, VOCAB = 8, 5, 12, 6, 30
CASES = {
    "infonce": (["loss.name=infonce"], 0),
    "hinge_sum": (["loss.name=hinge", "loss.warmup_epochs=1"], 0),
    "hinge_hardest": (["loss.name=hinge", "loss.warmup_epochs=1"], 1),
    "uto": (["loss.name=uto", "loss.gamma=0.1", "loss.batch_weight=2.0"], 0),
    "uto_tolerant": (["loss.name=uto", "loss.gamma=0.1", "loss.tolerance=quantile", "loss.tolerance_q=0.2",
                      "loss.balance=true", "loss.balance_threshold=0.3"], 0),
    "infonce_soft": (["loss.name=infonce", "loss.tolerance=soft", "loss.balance=true"], 0),
}


def _config(case: str) -> RetrievalTrainConfig:
    return load_config(RetrievalTrainConfig, None, [
        "model.embed_dim=16", f"model.region_dim={DIM}", "model.text_encoder=bigru", "model.word_dim=8",
        "model.queue_size=20", "model.sge_dropout=0.0", "model.momentum=0.9", *CASES[case][0]])


def _batch() -> dict[str, torch.Tensor]:
    """2 x PAIRS pairs; images 0..5 have two captions each (same-id pairs across the ranks' halves)."""
    g = torch.Generator().manual_seed(5)
    return {"regions": torch.randn(2 * PAIRS, REGIONS, DIM, generator=g),
            "region_lengths": torch.randint(2, REGIONS + 1, (2 * PAIRS,), generator=g),
            "tokens": torch.randint(1, VOCAB, (2 * PAIRS, TOKENS), generator=g),
            "token_lengths": torch.randint(2, TOKENS + 1, (2 * PAIRS,), generator=g),
            "image_ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 8, 9])}


def _model(case: str) -> USERModel:
    cfg = _config(case)
    torch.manual_seed(0)
    model = USERModel(cfg.model, cfg.loss, vocab_size=VOCAB).train()
    model.set_epoch(CASES[case][1])
    # a queue that already holds keys, some of the batch's own images among them
    g = torch.Generator().manual_seed(9)
    for queue in (model.image_queue, model.text_queue, model.semantic_queue):
        if queue is not None:  # the semantic queue: tolerant cases only
            queue.enqueue(torch.nn.functional.normalize(torch.randn(7, queue.keys.shape[1], generator=g), dim=1),
                          torch.tensor([3, 11, 12, 0, 13, 14, 15]))
    return model


def _step(model: USERModel, batch: dict[str, torch.Tensor], world) -> dict:
    """One SGD step (plain SGD: the update is proportional to the gradient, so a scale error shows), the forward
    through ``data_parallel`` as the trainer's (DistributedDataParallel on 2 ranks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    train_step = data_parallel(model, world, torch.device("cpu"))  # held: its reducer averages in the backward
    losses = train_step(batch)
    losses["loss"].backward()
    optimizer.step()
    model.momentum_step()
    return {"loss": losses["loss"].item(), "state": model.state_dict()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = init_world(torch.device("cpu"), timeout_s=60)
    try:
        rows = slice(rank * PAIRS, (rank + 1) * PAIRS)
        for case in CASES:
            model = _model(case)
            model.set_world(world)
            step = _step(model, {k: v[rows] for k, v in _batch().items()}, world)
            torch.save(step, Path(out) / f"{case}_rank{rank}.pt")
    finally:
        close_world(world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case's step on 2 spawned ranks (one launch for all cases)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_take_the_one_process_step_of_the_global_batch(case: str, two_ranks: Path) -> None:
    reference = _step(_model(case), _batch(), SINGLE_PROCESS)
    ranks = [torch.load(two_ranks / f"{case}_rank{r}.pt", weights_only=True) for r in range(2)]
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    before = _model(case).state_dict()
    for name, expected in reference["state"].items():
        for rank in ranks:
            assert torch.allclose(rank["state"][name].float(), expected.float(), rtol=1e-4, atol=2e-5), (name, case)
        if name.endswith("_queue.keys") or name.endswith("_queue.ids"):  # identical on both ranks, bit for bit
            assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    moved = [n for n, p in reference["state"].items() if p.is_floating_point() and not torch.equal(p, before[n])
             and n.startswith(("image_encoder.", "text_encoder."))]
    assert moved, "the step changed no online weight: the comparison would prove nothing"
