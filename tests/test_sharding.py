"""The data-parallel sharding: ranks' slices put back in rank order are the one-process batches."""

import pytest

from xmcl.errors import CheckpointError
from xmcl.runtime.distributed import SINGLE_PROCESS, World
from xmcl.training.retrieval_trainer import epoch_batches
from xmcl.training.sharding import check_world_size, rank_batches


def test_two_ranks_of_b_see_the_samples_of_one_rank_of_2b() -> None:
    one = epoch_batches(40, 8, seed=3, epoch=1, max_steps=None)
    ranks = [rank_batches(one, World(rank=r, size=2)) for r in range(2)]
    assert [len(s) for s in ranks] == [len(one)] * 2
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch  # rank order = gather order
        assert len(ranks[0][step]) == len(ranks[1][step]) == 4


def test_short_last_batch_is_cut_equally_and_one_process_is_unchanged() -> None:
    one = epoch_batches(21, 8, seed=0, epoch=0, max_steps=None)  # 8, 8, 5
    assert rank_batches(one, SINGLE_PROCESS) == one
    shards = [rank_batches(one, World(rank=r, size=2)) for r in range(2)]
    assert [len(s[-1]) for s in shards] == [2, 2]
    assert set(shards[0][-1]) | set(shards[1][-1]) < set(one[-1])
    tiny = [[0, 1, 2]]
    assert rank_batches(tiny, World(rank=1, size=2)) == []  # no rank would get an in-batch negative


def test_resume_with_another_world_size_is_refused_naming_both_sizes() -> None:
    check_world_size({"world_size": 2}, World(rank=1, size=2), "out/last.pt")
    check_world_size({}, SINGLE_PROCESS, "out/last.pt")  # a checkpoint from before world sizes were recorded
    with pytest.raises(CheckpointError, match=r"out/last.pt was saved by a run of 2 process\(es\); this run has 1"):
        check_world_size({"world_size": 2}, SINGLE_PROCESS, "out/last.pt")
