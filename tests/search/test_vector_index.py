"""The vector index: the choice follows size and memory budget; IVF and HNSW tuned to recall@10 >= 0.95, the reported
recall recomputed independently against brute force; exact search equal to brute force."""

from __future__ import annotations

import numpy as np
import pytest

from xmcl.errors import ConfigError
from xmcl.retrieval.index import vectors
from xmcl.retrieval.index.vectors import IndexPlan, choose_index, index_bytes, ivf_lists, parse_size

GIB = 1 << 30


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """12,000 unit vectors of 32 dimensions around 60 centres (the shape of real embedding collections)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 32))
    x = centres[rng.integers(0, 60, 12_000)] + 0.35 * rng.standard_normal((12_000, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force_top(vectors_: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors_.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_the_choice_follows_size_and_memory_budget() -> None:
    assert choose_index(5_000, 256).kind == "exact"
    assert choose_index(50_000, 256, 24 * GIB).kind == "hnsw"
    assert choose_index(1_000_000, 1024, 24 * GIB) == IndexPlan("ivf_flat", 2048)
    assert choose_index(1_000_000, 1024, 2 * GIB) == IndexPlan("ivf_sq8", 2048)
    small = choose_index(1_000_000, 1024, GIB // 4)
    assert small.kind == "ivf_pq" and index_bytes(small, 1_000_000, 1024) <= GIB // 4
    assert choose_index(50_000, 256, 24 * GIB, kind="ivf_flat").kind == "ivf_flat"
    # 2 sqrt(n) rounded to a power of two, at least 16, at most n / 39
    assert [ivf_lists(n) for n in (100, 20_000, 1_000_000, 100_000_000)] == [16, 256, 2048, 16384]
    assert index_bytes(IndexPlan("ivf_flat", 2048), 1_000_000, 1024) == 1_000_000 * (4 * 1024 + 8) + 2048 * 1024 * 4
    assert parse_size("8G") == 8 * GIB and parse_size("512MB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(ConfigError, match="memory budget"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="needs at least 624 vectors"):
        choose_index(100, 32, kind="ivf_flat")


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_tuned_recall_reaches_the_target_and_is_what_brute_force_says(clustered: np.ndarray, kind: str) -> None:
    plan = choose_index(len(clustered), 32, kind=kind)
    index, report = vectors.build_and_tune(clustered, plan, target=0.95, sample=300)
    tuning = report["tuning"]
    assert tuning["parameter"] == vectors.PARAMETER[kind] and tuning["target_met"] and tuning["recall"] >= 0.95

    queries = vectors.held_out_sample(len(clustered), 300)
    truth = brute_force_top(clustered, clustered[queries], 11)
    found = index.search(clustered[queries], 11)[1]
    hits = []
    for q, own in enumerate(queries):
        want = [i for i in truth[q] if i != own][:10]
        got = [i for i in found[q] if i != own][:10]
        hits.append(len(set(want) & set(got)) / 10)
    assert np.mean(hits) == pytest.approx(tuning["recall"], abs=1e-9)

    if tuning["value"] > (1 if kind != "hnsw" else 16):  # the next smaller setting misses the target
        vectors.set_parameter(index, plan, tuning["value"] // 2)
        lower = index.search(clustered[queries], 11)[1]
        assert vectors.recall_at_k(lower, truth, queries, 10) < 0.95


def test_exact_index_equals_brute_force(clustered: np.ndarray) -> None:
    index = vectors.build(clustered, IndexPlan("exact"))
    queries = clustered[:25] + 0.1
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, brute_force_top(clustered, queries, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ clustered.T, ids, axis=1), rtol=1e-5)
