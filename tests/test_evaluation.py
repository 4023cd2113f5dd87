"""The retrieval protocol against the classic per-query argsort loop (stable sort, ties included), a hand-computed
1K-fold example, and its error cases."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import xmcl.metrics.retrieval as evaluation
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.retrieval import (
    Metrics,
    Ranks,
    evaluate_embeddings,
    evaluate_similarity,
    fold_ranks,
    format_table,
    retrieval_ranks,
    save_json,
)


# ------------------------------------------------------------------------------------ references
def classic_descending(scores: np.ndarray) -> np.ndarray:
    """The classic code's candidate order, ``np.argsort(d)[::-1]``, on a sort that keeps equal scores in index
    order (numpy's default argsort does not promise it): ties come out larger index first."""
    return np.argsort(scores, kind="stable")[::-1]


def brute_ranks(sim: np.ndarray, caption_image: np.ndarray, descending=classic_descending):
    """Per query, a full sort of its candidates, then the position of the first ground truth."""
    i2t = np.array([np.flatnonzero(np.isin(descending(row), np.flatnonzero(caption_image == n)))[0]
                    for n, row in enumerate(sim)])
    t2i = np.array([np.flatnonzero(descending(sim[:, m]) == caption_image[m])[0] for m in range(sim.shape[1])])
    return i2t, t2i


def classic_i2t_t2i(images: np.ndarray, captions: np.ndarray) -> tuple[tuple, tuple]:
    """VSE++/SCAN's ``i2t`` and ``t2i`` as written (5 consecutive captions per image, images repeated 5 times),
    with the stable sort: ``(r1, r5, r10, medr, meanr)`` of each direction."""
    npts = images.shape[0] // 5
    ranks = np.zeros(npts)
    for index in range(npts):
        d = np.dot(images[5 * index].reshape(1, -1), captions.T).flatten()
        inds = np.argsort(d, kind="stable")[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            rank = min(rank, np.where(inds == i)[0][0])
        ranks[index] = rank
    i2t = ranks
    ims = np.array([images[i] for i in range(0, len(images), 5)])
    ranks = np.zeros(5 * npts)
    for index in range(npts):
        d = np.dot(captions[5 * index:5 * index + 5], ims.T)
        for i in range(5):
            inds = np.argsort(d[i], kind="stable")[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    out = []
    for r in (i2t, ranks):
        r1, r5, r10 = (100.0 * len(np.where(r < k)[0]) / len(r) for k in (1, 5, 10))
        out.append((r1, r5, r10, np.floor(np.median(r)) + 1, r.mean() + 1))
    return out[0], out[1]


def old_order(scores: np.ndarray) -> np.ndarray:
    """Score descending, smaller index first on ties: the order this module used before it matched the classic
    code (a reference that must differ on tied inputs, so that the ties are shown to decide ranks)."""
    return np.argsort(-scores, kind="stable")


def reference_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict:
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.count_nonzero(r < k) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.sum() / len(r) + 1
    out["rsum"] = sum(out[f"{name}_r{k}"] for name in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics(metrics: Metrics, expected: dict) -> None:
    got = metrics.as_dict()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def random_caption_image(rng: np.random.Generator, num_images: int) -> np.ndarray:
    """1 to 7 captions per image (both extremes present), in shuffled order."""
    counts = rng.integers(1, 8, num_images)
    counts[:2] = (1, 7)
    caption_image = np.repeat(np.arange(num_images), counts)
    rng.shuffle(caption_image)
    return caption_image


def unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------- brute-force checks
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_similarity_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    caption_image = random_caption_image(rng, 40)
    sim = unit(rng, 40, 16) @ unit(rng, len(caption_image), 16).T
    ranks = retrieval_ranks(sim, caption_image)
    i2t, t2i = brute_ranks(sim, caption_image)
    np.testing.assert_array_equal(ranks.i2t, i2t)
    np.testing.assert_array_equal(ranks.t2i, t2i)
    assert_metrics(evaluate_similarity(sim, caption_image)["all"], reference_metrics(i2t, t2i))


def test_quantised_embeddings_with_many_ties_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    caption_image = random_caption_image(rng, 30)
    images = rng.integers(-1, 2, (30, 3))
    texts = rng.integers(-1, 2, (len(caption_image), 3))
    sim = (images @ texts.T).astype(np.float32)  # small integers: exact in float32, scores repeat everywhere
    i2t, t2i = brute_ranks(sim, caption_image)
    other = brute_ranks(sim, caption_image, descending=old_order)
    assert (other[0] != i2t).any() and (other[1] != t2i).any(), "the ties must decide some ranks"
    ranks = retrieval_ranks(sim, caption_image)
    np.testing.assert_array_equal(ranks.i2t, i2t)
    np.testing.assert_array_equal(ranks.t2i, t2i)
    result = evaluate_embeddings(torch.tensor(images, dtype=torch.float32), texts.astype(np.float64), caption_image)
    assert_metrics(result["all"], reference_metrics(i2t, t2i))


def test_tied_inputs_match_the_classic_loop_as_written() -> None:
    """Quantised embeddings (scores repeat everywhere, identical captions of different images tie exactly)
    against VSE++'s own i2t/t2i loops; the order of the old convention must give other figures."""
    rng = np.random.default_rng(11)
    images = np.repeat(rng.integers(-1, 2, (40, 3)), 5, axis=0).astype(np.float32)  # 40 images, as 5x rows
    captions = rng.integers(-1, 2, (200, 3)).astype(np.float32)
    captions[7::9] = captions[0]  # identical captions spread over many images
    caption_image = np.repeat(np.arange(40), 5)
    classic_i2t, classic_t2i = classic_i2t_t2i(images, captions)
    got = evaluate_embeddings(images[::5], captions, caption_image)["all"]
    assert (got.i2t_r1, got.i2t_r5, got.i2t_r10, got.i2t_medr, got.i2t_meanr) == pytest.approx(classic_i2t)
    assert (got.t2i_r1, got.t2i_r5, got.t2i_r10, got.t2i_medr, got.t2i_meanr) == pytest.approx(classic_t2i)
    old = reference_metrics(*brute_ranks(images[::5] @ captions.T, caption_image, descending=old_order))
    assert (old["i2t_r1"], old["t2i_r1"]) != pytest.approx((got.i2t_r1, got.t2i_r1))


def test_duplicate_captions_and_duplicate_images() -> None:
    rng = np.random.default_rng(4)
    caption_image = random_caption_image(rng, 12)
    images = rng.integers(-4, 5, (12, 8)) / 4.0
    images[5] = images[3]
    texts = rng.integers(-4, 5, (len(caption_image), 8)) / 4.0
    texts[1::3] = texts[0]  # a third of the captions identical, spread over several images
    sim = (images @ texts.T).astype(np.float32)  # quarters times quarters: exact
    i2t, t2i = brute_ranks(sim, caption_image)
    for chunk_size in (1, 7, 50, evaluation.DEFAULT_CHUNK_SIZE):
        ranks = retrieval_ranks(sim, caption_image, chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks.i2t, i2t)
        np.testing.assert_array_equal(ranks.t2i, t2i)
    result = evaluate_embeddings(images, texts, caption_image, protocols=("all",), chunk_size=13)
    assert_metrics(result["all"], reference_metrics(i2t, t2i))


def test_chunk_size_does_not_change_results() -> None:
    rng = np.random.default_rng(5)
    caption_image = random_caption_image(rng, 25)
    sim = np.round(unit(rng, 25, 4) @ unit(rng, len(caption_image), 4).T, 1).astype(np.float32)
    i2t, t2i = brute_ranks(sim, caption_image)
    for chunk_size in (1, 2, 3, 31, 10_000):
        ranks = retrieval_ranks(torch.from_numpy(sim), torch.from_numpy(caption_image), chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks.i2t, i2t)
        np.testing.assert_array_equal(ranks.t2i, t2i)


def test_ties_at_zero_stay_exact_when_denormals_are_flushed() -> None:
    """With flush-to-zero on, nextafter(0, -inf) is -0: zero targets must still count the zeros before them."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        rng = np.random.default_rng(9)
        caption_image = random_caption_image(rng, 15)
        sim = rng.integers(-1, 2, (15, len(caption_image))).astype(np.float32)
        i2t, t2i = brute_ranks(sim, caption_image)
        for chunk_size in (1, 40, 10_000):
            ranks = retrieval_ranks(sim, caption_image, chunk_size=chunk_size)
            np.testing.assert_array_equal(ranks.i2t, i2t)
            np.testing.assert_array_equal(ranks.t2i, t2i)
    finally:
        torch.set_flush_denormal(False)


def test_fold5_matches_brute_force_on_each_fold() -> None:
    rng = np.random.default_rng(6)
    caption_image = random_caption_image(rng, 20)
    sim = np.round(unit(rng, 20, 8) @ unit(rng, len(caption_image), 8).T, 2).astype(np.float32)
    folds = fold_ranks(sim, caption_image, chunk_size=5)
    expected_folds = []
    for fold, ranks in enumerate(folds):
        images = np.arange(4 * fold, 4 * fold + 4)
        captions = np.flatnonzero(np.isin(caption_image, images))
        i2t, t2i = brute_ranks(sim[np.ix_(images, captions)], caption_image[captions] - 4 * fold)
        np.testing.assert_array_equal(ranks.i2t, i2t)
        np.testing.assert_array_equal(ranks.t2i, t2i)
        expected_folds.append(reference_metrics(i2t, t2i))
    result = evaluate_similarity(sim, caption_image, protocols=("fold5",))["fold5"]
    assert_metrics(result, {k: np.mean([f[k] for f in expected_folds]) for k in expected_folds[0]})
    for metrics, expected in zip(result.folds, expected_folds):
        assert_metrics(metrics, expected)


# ------------------------------------------------------------------------------------- by hand
def hand_similarity() -> tuple[np.ndarray, np.ndarray]:
    """10 images x 20 captions (2 each, stored image by image): own captions score 1, others 0, except
    image 0 scores its captions 0.5 and caption 2 (image 1) 0.9; image 2 scores caption 19 (image 9, another fold) 2;
    image 7 scores caption 12 (image 6) 1, a tie that image 7 wins (larger index first) for caption 12."""
    caption_image = np.repeat(np.arange(10), 2)
    sim = (caption_image[None, :] == np.arange(10)[:, None]).astype(np.float32)
    sim[0, [0, 1, 2]] = (0.5, 0.5, 0.9)
    sim[2, 19] = 2.0
    sim[7, 12] = 1.0
    return sim, caption_image


def test_fold5_and_all_by_hand() -> None:
    sim, caption_image = hand_similarity()
    results = evaluate_similarity(sim, caption_image, protocols=("all", "fold5"))
    perfect = dict(r1=100, r5=100, r10=100, medr=1, meanr=1)

    def figures(i2t: dict, t2i: dict) -> dict:
        out = {f"i2t_{k}": v for k, v in {**perfect, **i2t}.items()}
        out.update({f"t2i_{k}": v for k, v in {**perfect, **t2i}.items()})
        out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        return out

    # fold 1: image 0 ranks its caption 0 second (caption 2 first): i2t ranks (1, 0), median 0.5 -> medr 1.
    # fold 4: caption 12's column is (1, 1) for images 6 and 7: image 7 comes first, so t2i ranks (1, 0, 0, 0);
    # image 7's row ties captions 12, 14 and 15 at 1: caption 15 (its own) comes first.
    expected_folds = [figures(dict(r1=50, meanr=1.5), {}), figures({}, {}), figures({}, {}),
                      figures({}, dict(r1=75, meanr=1.25)), figures({}, {})]
    assert [f["rsum"] for f in expected_folds] == [550, 600, 600, 575, 600]
    for metrics, expected in zip(results["fold5"].folds, expected_folds):
        assert_metrics(metrics, expected)
    assert_metrics(results["fold5"], dict(i2t_r1=90, i2t_meanr=1.1, t2i_r1=95, t2i_meanr=1.05, rsum=585,
                                          i2t_r5=100, i2t_medr=1, t2i_medr=1))
    # all: image 2 also loses to caption 19 and caption 19 to image 2 (excluded from the folds); image 0 as above.
    assert_metrics(results["all"], dict(i2t_r1=80, i2t_r5=100, i2t_medr=1, i2t_meanr=1.2,
                                        t2i_r1=90, t2i_r5=100, t2i_medr=1, t2i_meanr=1.1, rsum=570))
    assert results["all"].folds == ()


def test_medr_and_meanr_formulas() -> None:
    metrics = Ranks(i2t=np.array([0, 1, 2, 9]), t2i=np.array([0, 0, 4, 5, 30])).metrics()
    assert_metrics(metrics, dict(i2t_r1=25, i2t_r5=75, i2t_r10=100, i2t_medr=2, i2t_meanr=4,
                                 t2i_r1=40, t2i_r5=60, t2i_r10=80, t2i_medr=5, t2i_meanr=8.8, rsum=380))


def test_one_similarity_serves_every_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = evaluation.similarity_matrix

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "similarity_matrix", counting)
    rng = np.random.default_rng(7)
    images, texts = unit(rng, 10, 6), unit(rng, 30, 6)
    caption_image = np.repeat(np.arange(10), 3)
    results = evaluate_embeddings(images, texts, caption_image, protocols=("all", "fold5"))
    assert len(calls) == 1 and list(results) == ["all", "fold5"] and len(results["fold5"].folds) == 5
    alone = evaluate_similarity(original(images, texts), caption_image, protocols=("fold5",))["fold5"]
    assert results["fold5"] == alone


# --------------------------------------------------------------------------------------- reports
def test_format_table_and_json(tmp_path: Path) -> None:
    sim, caption_image = hand_similarity()
    results = evaluate_similarity(sim, caption_image, protocols=("all", "fold5"))
    table = format_table(results)
    lines = table.splitlines()
    assert "image-to-text" in lines[0] and "text-to-image" in lines[0] and "rSum" in lines[1]
    rows = {line[:8].strip(): line[8:].split() for line in lines[2:]}  # names are at most 8 wide ("  fold 5")
    # per direction R@1, R@5, R@10, median rank, mean rank (two images of ten at rank 2: mean 1.2), then rSum
    assert rows["all"] == ["80.00", "100.00", "100.00", "1.0", "1.20", "90.00", "100.00", "100.00", "1.0", "1.10",
                           "570.00"]
    assert rows["fold5"] == ["90.00", "100.00", "100.00", "1.0", "1.10", "95.00", "100.00", "100.00", "1.0", "1.05",
                             "585.00"]
    assert rows["fold 1"] == ["50.00", "100.00", "100.00", "1.0", "1.50", "100.00", "100.00", "100.00", "1.0",
                              "1.00", "550.00"]
    assert rows["fold 4"] == ["100.00", "100.00", "100.00", "1.0", "1.00", "75.00", "100.00", "100.00", "1.0",
                              "1.25", "575.00"]
    assert lines[1].split()[:6] == ["run", "R@1", "R@5", "R@10", "medr", "meanr"]
    assert len(lines) == 2 + 2 + 5 and len({len(line) for line in lines[1:]}) == 1
    assert len(format_table(results, show_folds=False).splitlines()) == 4
    assert format_table(results, label="protocol").splitlines()[1].split()[0] == "protocol"

    path = save_json(results, tmp_path / "out" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["all"]["rsum"] == 570 and loaded["fold5"]["t2i_meanr"] == pytest.approx(1.05)
    assert [fold["rsum"] for fold in loaded["fold5"]["folds"]] == [550, 600, 600, 575, 600]
    assert "folds" not in loaded["all"]


# ---------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_named_errors() -> None:
    rng = np.random.default_rng(8)
    images, texts = unit(rng, 7, 4), unit(rng, 14, 4)
    caption_image = np.repeat(np.arange(7), 2)
    with pytest.raises(DataError, match="dimension 4 but caption embeddings 5"):
        evaluate_embeddings(images, unit(rng, 14, 5), caption_image)
    with pytest.raises(DataError, match=r"one entry per caption \(14\)"):
        evaluate_embeddings(images, texts, caption_image[:-1])
    with pytest.raises(DataError, match=r"caption_image\[3\] = 7 is not an image index \(there are 7 images\)"):
        evaluate_embeddings(images, texts, np.where(np.arange(14) == 3, 7, caption_image))
    with pytest.raises(DataError, match=r"caption_image\[0\] = -1"):
        evaluate_embeddings(images, texts, np.where(np.arange(14) == 0, -1, caption_image))
    with pytest.raises(DataError, match="integer image indices"):
        evaluate_embeddings(images, texts, caption_image.astype(np.float32))
    with pytest.raises(DataError, match="image 6 has no caption"):
        evaluate_embeddings(images, texts, np.minimum(caption_image, 5))
    with pytest.raises(DataError, match="divisible by 5, got 7"):
        evaluate_embeddings(images, texts, caption_image, protocols=("all", "fold5"))
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'fold10'"):
        evaluate_embeddings(images, texts, caption_image, protocols=("fold10",))
    with pytest.raises(ConfigError, match="chunk_size"):
        retrieval_ranks(images @ texts.T, caption_image, chunk_size=0)
    nan_texts = texts.copy()
    nan_texts[2, 1] = np.nan
    with pytest.raises(DataError, match=r"caption embeddings: non-finite value .* at \(2, 1\)"):
        evaluate_embeddings(images, nan_texts, caption_image)
    with pytest.raises(DataError, match="similarity matrix must be a non-empty 2-D matrix"):
        evaluate_similarity(np.zeros(14, dtype=np.float32), caption_image)
    with pytest.raises(DataError, match="real numbers"):
        evaluate_similarity(np.zeros((7, 14), dtype=bool), caption_image)
