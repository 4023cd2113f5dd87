"""Retrieval losses (UTO, VSE++ hinge, InfoNCE) against explicit loops over i, j in double precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmcl.contrast import HingeLoss, InfoNCELoss, UTOLoss, build_retrieval_loss
from xmcl.errors import ConfigError, DataError

IDS = [0, 1, 1, 2, 3]  # captions 1 and 2 describe the same image
QUEUE_IDS = [1, 4, 0, 5, 2, 6, 7]
QUEUE_VALID = [True, True, True, True, True, False, False]


def unit(rows: int, dim: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=1)


def make_inputs(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, d, k = len(IDS), 6, len(QUEUE_IDS)
    return {
        "img": unit(b, d, g, dtype), "txt": unit(b, d, g, dtype), "image_ids": torch.tensor(IDS),
        "img_key": unit(b, d, g, dtype), "txt_key": unit(b, d, g, dtype),
        "img_queue": unit(k, d, g, dtype), "txt_queue": unit(k, d, g, dtype),
        "queue_ids": torch.tensor(QUEUE_IDS), "queue_valid": torch.tensor(QUEUE_VALID),
    }


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def as_lists(x: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: value.tolist() for name, value in x.items()}


def directions(x: dict[str, list], keep: bool):
    """For each of the four directional terms, per query: (positive score, [negative scores])."""
    ids, b = x["image_ids"], len(x["image_ids"])
    s = [[dot(x["img"][i], x["txt"][j]) for j in range(b)] for i in range(b)]
    rows = [(s[i][i], [s[i][j] for j in range(b) if ids[j] != ids[i]]) for i in range(b)]
    cols = [(s[j][j], [s[i][j] for i in range(b) if ids[i] != ids[j]]) for j in range(b)]

    def queue(query, key, bank):
        out = []
        for q in range(b):
            negs = [dot(query[q], bank[k]) for k in range(len(bank))
                    if x["queue_valid"][k] and (keep or x["queue_ids"][k] != ids[q])]
            out.append((dot(query[q], key[q]), negs))
        return out

    return rows, cols, queue(x["img"], x["txt_key"], x["txt_queue"]), queue(x["txt"], x["img_key"], x["img_queue"])


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def ref_uto(x, mu, gamma, batch_weight, keep):
    rows, cols, q_i2t, q_t2i = directions(as_lists(x), keep)

    def soft(negs):
        return math.log(1.0 + sum(math.exp(mu * (n - gamma)) for n in negs)) / mu

    batch = (mean(soft(n) for _, n in rows) + mean(soft(n) for _, n in cols)
             - mean(math.log(1.0 + max(p, 0.0)) for p, _ in rows))
    queue = [mean(soft(n) - math.log(1.0 + max(p, 0.0)) for p, n in d) for d in (q_i2t, q_t2i)]
    return batch, queue, batch_weight * batch + sum(queue)


def ref_hinge(x, margin, hardest, keep):
    terms = []
    for d in directions(as_lists(x), keep):
        costs = [[max(0.0, margin + n - p) for n in negs] for p, negs in d]
        terms.append(sum(max(c) if hardest else sum(c) for c in costs))
    return terms[0] + terms[1], terms[2:], sum(terms)


def ref_infonce(x, scale, keep):
    terms = []
    for d in directions(as_lists(x), keep):
        terms.append(mean(-math.log(math.exp(scale * p) / (math.exp(scale * p) + sum(math.exp(scale * n) for n in negs)))
                          for p, negs in d))
    return terms[0] + terms[1], terms[2:], sum(terms)


def check(out, ref, rel=1e-10):
    batch, queue, total = ref
    assert out["batch"].item() == pytest.approx(batch, rel=rel, abs=1e-12)
    assert out["queue_i2t"].item() == pytest.approx(queue[0], rel=rel, abs=1e-12)
    assert out["queue_t2i"].item() == pytest.approx(queue[1], rel=rel, abs=1e-12)
    assert out["loss"].item() == pytest.approx(total, rel=rel, abs=1e-12)


@pytest.mark.parametrize("mode", ["mask", "keep"])
@pytest.mark.parametrize("mu,gamma,weight", [(90.0, 0.5, 1.0), (10.0, 0.2, 20.0)])
def test_uto_matches_loops(mode, mu, gamma, weight):
    x = make_inputs(1)
    out = UTOLoss(mu=mu, gamma=gamma, batch_weight=weight, queue_false_negatives=mode)(**x)
    check(out, ref_uto(x, mu, gamma, weight, keep=mode == "keep"))


def test_uto_keep_and_mask_differ_when_queue_holds_the_query_image():
    x = make_inputs(2)
    masked = UTOLoss(mu=5.0, queue_false_negatives="mask")(**x)["queue_i2t"]
    kept = UTOLoss(mu=5.0, queue_false_negatives="keep")(**x)["queue_i2t"]
    assert kept.item() > masked.item()


def test_uto_is_stable_where_naive_exp_overflows():
    # float32, mu = 200: exp(mu (1 - gamma)) = exp(100) overflows float32; the reference runs in double.
    g = torch.Generator().manual_seed(3)
    base = unit(1, 8, g, torch.float32)
    img = F.normalize(base + 0.01 * torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(base + 0.01 * torch.randn(6, 8, generator=g), dim=1)
    ids = torch.arange(6)
    naive = torch.exp(200.0 * ((img @ txt.T) - 0.5))
    assert torch.isinf(naive).any()
    out = UTOLoss(mu=200.0, gamma=0.5)(img, txt, ids)
    s = [[dot(img.double()[i].tolist(), txt.double()[j].tolist()) for j in range(6)] for i in range(6)]

    def soft(negs):  # log(1 + sum exp(a_k)) = m + log(exp(-m) + sum exp(a_k - m)) in double
        a = [200.0 * (n - 0.5) for n in negs]
        m = max(a)
        return (m + math.log(math.exp(-m) + sum(math.exp(v - m) for v in a))) / 200.0

    ref = (mean(soft([s[i][j] for j in range(6) if j != i]) for i in range(6))
           + mean(soft([s[i][j] for i in range(6) if i != j]) for j in range(6))
           - mean(math.log1p(max(s[i][i], 0.0)) for i in range(6)))
    assert torch.isfinite(out["loss"]) and "queue_i2t" not in out
    assert out["loss"].item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("epoch,hardest", [(0, False), (1, True), (5, True)])
@pytest.mark.parametrize("mode", ["mask", "keep"])
def test_hinge_matches_loops_and_warms_up(epoch, hardest, mode):
    x = make_inputs(4)
    loss = HingeLoss(margin=0.2, warmup_epochs=1, queue_false_negatives=mode)
    loss.set_epoch(epoch)
    check(loss(**x), ref_hinge(x, 0.2, hardest, keep=mode == "keep"))


@pytest.mark.parametrize("mode", ["mask", "keep"])
def test_infonce_matches_loops(mode):
    x = make_inputs(5)
    loss = InfoNCELoss(init_temperature=0.07, queue_false_negatives=mode).double()
    scale = loss.scale().item()  # 1/0.07 rounded through the float32 initial parameter
    assert scale == pytest.approx(1 / 0.07)
    check(loss(**x), ref_infonce(x, scale, keep=mode == "keep"))


def test_infonce_temperature_is_learnable_and_capped():
    x = make_inputs(6)
    loss = InfoNCELoss(init_temperature=0.07).double()
    loss(x["img"], x["txt"], x["image_ids"])["loss"].backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.item() != 0.0
    capped = InfoNCELoss(init_temperature=0.001).double()  # 1/t = 1000 > 100
    assert capped.scale().item() == pytest.approx(100.0)
    out = capped(x["img"], x["txt"], x["image_ids"])
    out["loss"].backward()
    assert capped.log_scale.grad.item() == 0.0
    assert out["batch"].item() == pytest.approx(ref_infonce(x, 100.0, keep=False)[0], rel=1e-10)
    fixed = InfoNCELoss(learnable=False)
    assert list(fixed.parameters()) == [] and "log_scale" in fixed.state_dict()


def grad_of_similarity(loss, ids, sim):
    """dL/dS for a given similarity matrix S: with img = I, S = txt^T, so dL/dtxt[j, i] = dL/dS[i, j]."""
    b = sim.shape[0]
    txt = sim.T.clone().requires_grad_(True)
    loss(torch.eye(b, dtype=sim.dtype), txt, ids)["loss"].backward()
    return txt.grad.T


@pytest.mark.parametrize("loss", [UTOLoss(mu=10.0), HingeLoss(margin=0.5, warmup_epochs=1),
                                  InfoNCELoss().double()], ids=["uto", "hinge", "infonce"])
def test_same_image_pairs_get_no_gradient_and_negatives_do(loss):
    ids = torch.tensor(IDS)
    sim = 0.3 * torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.3
    grad = grad_of_similarity(loss, ids, sim)
    same = ids[:, None] == ids[None, :]
    off_diagonal_same = same & ~torch.eye(5, dtype=torch.bool)
    assert off_diagonal_same.any()
    assert (grad[off_diagonal_same] == 0).all()
    assert (grad[~same] > 0).all()  # raising a negative's score raises the loss
    assert (grad.diagonal() < 0).all()  # raising a positive's score lowers it


def test_hardest_negative_only_after_warmup():
    ids = torch.arange(4)
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                        [0.1, 0.9, 0.2, 0.3],
                        [0.2, 0.1, 0.9, 0.1],
                        [0.3, 0.2, 0.1, 0.9]], dtype=torch.float64)
    loss = HingeLoss(margin=0.2)
    loss.set_epoch(1)
    grad = grad_of_similarity(loss, ids, sim)
    # row 0 violates with column 2 only (0.2 + 0.8 - 0.9 > 0): as image query, only S[0,2] is hardest
    assert grad[0, 1] == 0 and grad[0, 3] == 0 and grad[0, 2] > 0


def test_queue_and_keys_receive_no_gradient():
    x = make_inputs(8)
    for name in ("img", "txt", "img_key", "txt_key", "img_queue", "txt_queue"):
        x[name].requires_grad_(True)
    UTOLoss()(**x)["loss"].backward()
    assert x["img"].grad.abs().sum() > 0 and x["txt"].grad.abs().sum() > 0
    assert all(x[name].grad is None for name in ("img_key", "txt_key", "img_queue", "txt_queue"))


def test_invalid_queue_slots_are_ignored():
    x = make_inputs(9)
    out = UTOLoss(mu=5.0)(**x)
    changed = dict(x)
    changed["txt_queue"] = x["txt_queue"].clone()
    changed["txt_queue"][5:] = x["img"][0]  # garbage in invalid slots
    assert UTOLoss(mu=5.0)(**changed)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-12)


def test_factory_builds_named_losses_and_rejects_bad_config():
    assert isinstance(build_retrieval_loss("uto", mu=50.0, batch_weight=20.0), UTOLoss)
    assert isinstance(build_retrieval_loss("hinge"), HingeLoss)
    assert isinstance(build_retrieval_loss("infonce", init_temperature=0.05), InfoNCELoss)
    with pytest.raises(ConfigError, match="unknown retrieval loss 'triplet'"):
        build_retrieval_loss("triplet")
    with pytest.raises(ConfigError, match="margin"):
        build_retrieval_loss("uto", margin=0.2)
    with pytest.raises(ConfigError, match="queue_false_negatives"):
        UTOLoss(queue_false_negatives="drop")
    with pytest.raises(ConfigError, match="mu"):
        UTOLoss(mu=0.0)


def test_bad_inputs_are_named():
    x = make_inputs(10)
    loss = UTOLoss()
    with pytest.raises(DataError, match="img .* and txt"):
        loss(x["img"], x["txt"][:3], x["image_ids"])
    with pytest.raises(DataError, match="image_ids must be an integer"):
        loss(x["img"], x["txt"], x["image_ids"].double())
    with pytest.raises(DataError, match="img_key and txt_key"):
        loss(x["img"], x["txt"], x["image_ids"], img_queue=x["img_queue"], txt_queue=x["txt_queue"])
    with pytest.raises(DataError, match="queue_ids"):
        loss(**{**x, "queue_ids": None})
    with pytest.raises(DataError, match="queue_valid"):
        loss(**{**x, "queue_valid": x["queue_valid"].long()})


def test_warm_start_gives_uto_a_gradient_where_it_has_none() -> None:
    """All matching similarities negative (towers pointing apart): UTO's gradient is exactly zero, the hinge
    warm-up's is not; after the warm-up epochs the wrapper is UTO itself."""
    from xmcl.contrast import HingeLoss, UTOLoss, WarmStartLoss

    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(1, 8), dim=1)
    img = torch.nn.functional.normalize(base + 0.05 * torch.randn(6, 8), dim=1).requires_grad_(True)
    txt = torch.nn.functional.normalize(-base + 0.05 * torch.randn(6, 8), dim=1)
    ids = torch.arange(6)
    assert ((img @ txt.T) < 0).all()
    uto, hinge = UTOLoss(), HingeLoss(margin=0.2, warmup_epochs=1)
    wrapped = WarmStartLoss(uto, hinge, epochs=1)
    wrapped.set_epoch(0)
    (grad_warm,) = torch.autograd.grad(wrapped(img, txt, ids)["loss"], img)
    wrapped.set_epoch(1)
    out = wrapped(img, txt, ids)["loss"]
    (grad_main,) = torch.autograd.grad(out, img)
    assert grad_warm.abs().sum() > 0
    assert grad_main.abs().max() < 1e-12
    # hand-computed sum-of-violations hinge at epoch 0: sum over queries and negatives of [0.2 + s_qk - s_qq]_+
    s = (img @ txt.T).detach()
    expected = sum(max(0.0, 0.2 + s[q, k] - s[q, q]) + max(0.0, 0.2 + s[k, q] - s[q, q])
                   for q in range(6) for k in range(6) if k != q)
    wrapped.set_epoch(0)
    assert wrapped(img, txt, ids)["loss"].item() == pytest.approx(float(expected), rel=1e-5)
