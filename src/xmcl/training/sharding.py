"""Data-parallel sharding of an epoch's batches: every rank computes the same global batches (one permutation from
the run's seed and the epoch) and takes its contiguous slice of each, so ``size`` ranks with per-rank batch ``B``
see exactly the samples, in the same order, of one rank with batch ``size * B``. Slices are in rank order, matching
``gather_with_grad`` (rows of rank r at ``r * B``), so the gathered global batch equals the one-process batch.
A resume skips the same number of global batches on every rank, so each rank's position is restored exactly.
"""

from __future__ import annotations

from pathlib import Path

from xmcl.errors import CheckpointError
from xmcl.runtime.distributed import World


def rank_batches(global_batches: list[list[int]], world: World, min_share: int = 2) -> list[list[int]]:
    """Rank ``world.rank``'s slice of each global batch: batch ``b`` cut into ``world.size`` equal parts
    (``len(b) // size`` items each; a remainder of a short last batch is dropped so every rank's batch has the
    same size, which the all-gathers need). A global batch too short to give each rank ``min_share`` items (2: an
    in-batch negative for pairs; 1 for scenes, whose superpixels are the negatives) is dropped on every rank
    alike."""
    if not world.distributed:
        return global_batches
    shards = []
    for batch in global_batches:
        share = len(batch) // world.size
        if share < min_share:
            continue
        shards.append(batch[world.rank * share: (world.rank + 1) * share])
    return shards


def check_world_size(state: dict, world: World, where: Path | str) -> None:
    """Refuse to resume ``state`` (saved with ``state["world_size"]`` ranks; 1 when absent) in a world of another
    size: the ranks' slices of each global batch, and so the run, would differ from the one that stopped."""
    saved = int(state.get("world_size", 1))
    if saved != world.size:
        raise CheckpointError(f"{where} was saved by a run of {saved} process(es); this run has {world.size}: "
                              f"resume it with the same world size (torchrun --nproc_per_node/--nnodes giving "
                              f"{saved} in all), or use another --out folder")
