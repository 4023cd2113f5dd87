"""SLidR / ST-SLidR superpixel losses and their semantic weights, against explicit loops in double precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmcl.contrast import (
    STSlidrLoss,
    class_balance_weights,
    quantile_drop_mask,
    semantic_similarity,
    soft_negative_weights,
)
from xmcl.contrast.semantic_weights import row_quantile
from xmcl.errors import ConfigError, DataError

K, D, C, TAU = 9, 5, 4, 0.07


def make(seed: int):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    pix = F.normalize(f + 0.8 * torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    # three semantic groups plus noise, so that similarities span [-1, 1] and some exceed 0.5
    centres = torch.randn(3, C, generator=g, dtype=torch.float64)
    z = centres[torch.arange(K) % 3] + 0.5 * torch.randn(K, C, generator=g, dtype=torch.float64)
    return f, pix, z


def cosines(z: torch.Tensor) -> list[list[float]]:
    rows = z.tolist()
    norm = [math.sqrt(sum(v * v for v in r)) for r in rows]
    return [[sum(a * b for a, b in zip(rows[i], rows[j])) / (norm[i] * norm[j]) for j in range(K)] for i in range(K)]


def logit(f, pix, i, j) -> float:
    return sum(a * b for a, b in zip(f.tolist()[i], pix.tolist()[j])) / TAU


def ref_anchor_losses(f, pix, weight) -> list[float]:
    """l_i = -log(exp(x_ii) / (exp(x_ii) + sum_{j != i} weight(i, j, x_ij))), weight returns the j-th exp-term."""
    out = []
    for i in range(K):
        pos = math.exp(logit(f, pix, i, i))
        out.append(-math.log(pos / (pos + sum(weight(i, j, logit(f, pix, i, j)) for j in range(K) if j != i))))
    return out


def ref_dropped(s, q) -> list[list[bool]]:
    dropped = []
    for i in range(K):
        d = [1.0 - min(max(s[i][j], 0.0), 1.0) for j in range(K) if j != i]
        threshold = float(np.quantile(np.array(d), q))
        dropped.append([j != i and 1.0 - min(max(s[i][j], 0.0), 1.0) < threshold for j in range(K)])
    return dropped


def ref_balance(s, threshold) -> list[float]:
    votes = [sum(s[i][j] for j in range(K) if s[i][j] >= threshold) for i in range(K)]
    low, high = min(votes), max(votes)
    return [1.0 - (v - low) / (high - low) for v in votes]


def test_plain_slidr_matches_loops_and_ignores_semantic_features():
    f, pix, z = make(0)
    ref = sum(ref_anchor_losses(f, pix, lambda i, j, x: math.exp(x))) / K
    assert STSlidrLoss()(f, pix).item() == pytest.approx(ref, rel=1e-12)
    assert STSlidrLoss(tolerance="none", balance=False)(f, pix, z).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("q", [0.01, 0.3])
def test_quantile_tolerance_remove_and_authors_variants(q):
    f, pix, z = make(1)
    s = cosines(z)
    dropped = ref_dropped(s, q)
    assert any(any(row) for row in dropped)
    assert quantile_drop_mask(semantic_similarity(z), q).tolist() == dropped
    removed = sum(ref_anchor_losses(f, pix, lambda i, j, x: 0.0 if dropped[i][j] else math.exp(x))) / K
    authors = sum(ref_anchor_losses(f, pix, lambda i, j, x: 1.0 if dropped[i][j] else math.exp(x))) / K
    got_removed = STSlidrLoss(tolerance="quantile", quantile_variant="remove", q=q)(f, pix, z).item()
    got_authors = STSlidrLoss(tolerance="quantile", quantile_variant="authors", q=q)(f, pix, z).item()
    assert got_removed == pytest.approx(removed, rel=1e-12)
    assert got_authors == pytest.approx(authors, rel=1e-12)
    assert got_removed != pytest.approx(got_authors)


def test_soft_tolerance_weights_negatives_by_semantic_distance():
    f, pix, z = make(2)
    s = cosines(z)
    w = [[1.0 - min(max(s[i][j], 0.0), 1.0) for j in range(K)] for i in range(K)]
    assert any(s[i][j] < 0 for i in range(K) for j in range(K))  # the clip is exercised
    ref = sum(ref_anchor_losses(f, pix, lambda i, j, x: w[i][j] * math.exp(x))) / K
    assert STSlidrLoss(tolerance="soft")(f, pix, z).item() == pytest.approx(ref, rel=1e-12)
    weights = soft_negative_weights(semantic_similarity(z))
    assert weights.diagonal().tolist() == [1.0] * K
    assert weights.min() >= 0 and weights.max() <= 1


@pytest.mark.parametrize("tolerance", ["none", "quantile", "soft"])
def test_class_balancing_weights_anchors_by_votes(tolerance):
    f, pix, z = make(3)
    s = cosines(z)
    a = ref_balance(s, 0.5)
    assert class_balance_weights(semantic_similarity(z), 0.5).tolist() == pytest.approx(a, rel=1e-12)
    assert min(a) == pytest.approx(0.0) and max(a) == pytest.approx(1.0)
    dropped = ref_dropped(s, 0.2)

    def term(i, j, x):
        if tolerance == "quantile":
            return 0.0 if dropped[i][j] else math.exp(x)
        if tolerance == "soft":
            return (1.0 - min(max(s[i][j], 0.0), 1.0)) * math.exp(x)
        return math.exp(x)

    per_anchor = ref_anchor_losses(f, pix, term)
    ref = sum(ai * li for ai, li in zip(a, per_anchor)) / sum(a)
    got = STSlidrLoss(tolerance=tolerance, q=0.2, balance=True, threshold=0.5)(f, pix, z)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_equal_votes_give_uniform_weights():
    z = torch.ones(4, 3, dtype=torch.float64)
    assert class_balance_weights(semantic_similarity(z)).tolist() == [1.0] * 4
    f, pix, _ = make(4)
    plain = STSlidrLoss()(f[:4], pix[:4])
    assert STSlidrLoss(balance=True)(f[:4], pix[:4], z).item() == pytest.approx(plain.item(), rel=1e-12)


@pytest.mark.parametrize("variant", ["remove", "authors"])
def test_the_positive_is_kept_although_a_whole_row_rule_would_drop_it(variant: str) -> None:
    """d_ii = 0 is the smallest distance of every row, below the row's q-quantile: a rule over the whole row
    (diagonal included) would drop the positive. It stays in the numerator and the denominator."""
    f, pix, z = make(5)
    s = cosines(z)
    q = 0.5
    for i in range(K):
        row = [1.0 - min(max(s[i][j], 0.0), 1.0) for j in range(K)]
        assert min(row[j] for j in range(K) if j != i) > 0.0  # self-similarity 1 is the row's unique maximum
        assert row[i] < float(np.quantile(np.array(row), q))  # whole-row rule: the positive is below the cut
    dropped = ref_dropped(s, q)
    assert quantile_drop_mask(semantic_similarity(z), q).tolist() == dropped
    assert all(sum(row) > 0 for row in dropped)  # every anchor loses some negatives, never its positive
    filler = 1.0 if variant == "authors" else 0.0  # authors: a dropped logit becomes 0, adding exp(0)
    ref = sum(ref_anchor_losses(f, pix, lambda i, j, x: filler if dropped[i][j] else math.exp(x))) / K
    got = STSlidrLoss(tolerance="quantile", quantile_variant=variant, q=q)(f, pix, z)
    assert got.item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("variant", ["remove", "authors"])
def test_gradients_reach_features_but_not_dropped_pairs_or_semantics(variant):
    # With points = I, logits = pixels^T / tau, so d loss / d pixels[j, i] is the gradient of logit (i, j).
    f, pix, z = make(5)
    square = F.normalize(torch.randn(K, K, dtype=torch.float64, generator=torch.Generator().manual_seed(9)), dim=1)
    square.requires_grad_(True)
    z.requires_grad_(True)
    loss = STSlidrLoss(tolerance="quantile", quantile_variant=variant, q=0.3, balance=True)
    loss(torch.eye(K, dtype=torch.float64), square, z).backward()
    grad = square.grad.T  # grad[i, j] = d loss / d logit_ij * (1 / tau)
    dropped = quantile_drop_mask(semantic_similarity(z), 0.3)
    assert dropped.any()
    assert (grad[dropped] == 0).all()
    assert z.grad is None
    points, pixels = f.clone().requires_grad_(True), pix.clone().requires_grad_(True)
    loss(points, pixels, z).backward()
    assert points.grad.abs().sum() > 0 and pixels.grad.abs().sum() > 0


def test_row_quantile_matches_numpy():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 11, generator=g, dtype=torch.float64)
    for q in (0.0, 0.01, 0.25, 0.5, 0.99):
        expected = np.quantile(x.numpy(), q, axis=1)
        assert row_quantile(x, q).tolist() == pytest.approx(expected.tolist(), rel=1e-12)


def test_bad_input_and_config_are_named():
    f, pix, z = make(7)
    with pytest.raises(DataError, match="needs semantic"):
        STSlidrLoss(tolerance="soft")(f, pix)
    with pytest.raises(DataError, match="row 2 has zero norm"):
        STSlidrLoss(balance=True)(f, pix, torch.cat([z[:2], torch.zeros(1, C, dtype=z.dtype), z[3:]]))
    with pytest.raises(DataError, match="points"):
        STSlidrLoss()(f, pix[:3])
    with pytest.raises(DataError, match="semantic features"):
        STSlidrLoss(balance=True)(f, pix, z[:3])
    with pytest.raises(ConfigError, match="tolerance"):
        STSlidrLoss(tolerance="hard")
    with pytest.raises(ConfigError, match="quantile_variant"):
        STSlidrLoss(quantile_variant="zero")
    with pytest.raises(ConfigError, match="q must be"):
        STSlidrLoss(q=1.0)
