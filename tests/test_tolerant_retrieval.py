"""Semantically tolerant UTO / InfoNCE (ST-SLidR's tolerance and balancing on retrieval), against explicit loops
in double precision; the semantic queue of USERModel; the config switch."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmcl.config import load_config
from xmcl.contrast import GlobalBatch, InfoNCELoss, UTOLoss, build_retrieval_loss
from xmcl.contrast.semantic_weights import (
    class_balance_weights,
    quantile_drop_mask,
    row_quantile,
    semantic_similarity,
    soft_negative_weights,
)
from xmcl.errors import ConfigError, DataError
from xmcl.retrieval.config import RetrievalLossConfig, RetrievalTrainConfig
from xmcl.retrieval.model import USERModel, build_loss

from helpers import REGION_DIM, VOCAB, model_config, region_batch, retrieval_config, write_corpus

IDS = [0, 1, 1, 2, 3]  # captions 1 and 2 describe the same image
QUEUE_IDS = [1, 4, 0, 5, 2, 6, 7]
QUEUE_VALID = [True, True, True, True, True, False, False]
MU, GAMMA, SCALE = 20.0, 0.3, 1 / 0.07


def unit(rows: int, dim: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def make_inputs(seed: int = 0, ids: list[int] = IDS) -> dict[str, torch.Tensor]:
    """Embeddings, keys, queues and semantic vectors: one vector per image id (two groups plus noise, so that
    similarities span [-1, 1]); empty queue slots hold zeros."""
    g = torch.Generator().manual_seed(seed)
    b, d, k, c = len(ids), 6, len(QUEUE_IDS), 4
    centres = torch.randn(2, c, generator=g, dtype=torch.float64)
    per_image = centres[torch.arange(8) % 2] + 0.7 * torch.randn(8, c, generator=g, dtype=torch.float64)
    per_image = F.normalize(per_image, dim=1)
    queue_semantic = per_image[torch.tensor(QUEUE_IDS)] * torch.tensor(QUEUE_VALID, dtype=torch.float64)[:, None]
    return {
        "img": unit(b, d, g), "txt": unit(b, d, g), "image_ids": torch.tensor(ids),
        "img_key": unit(b, d, g), "txt_key": unit(b, d, g), "img_queue": unit(k, d, g), "txt_queue": unit(k, d, g),
        "queue_ids": torch.tensor(QUEUE_IDS), "queue_valid": torch.tensor(QUEUE_VALID),
        "semantic": per_image[torch.tensor(ids)], "queue_semantic": queue_semantic,
    }


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def clip01(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def ref_terms(x: dict[str, torch.Tensor], keep: bool, threshold: float):
    """The four directional terms, each a list over queries of (positive, [(score, s)] of the negatives, vote)."""
    v = {name: value.tolist() for name, value in x.items()}
    ids, b, k = v["image_ids"], len(v["image_ids"]), len(v["queue_ids"])
    z, zq = v["semantic"], v["queue_semantic"]
    sem = [[dot(z[i], z[j]) for j in range(b)] for i in range(b)]
    semq = [[dot(z[i], zq[j]) for j in range(k)] for i in range(b)]
    s = [[dot(v["img"][i], v["txt"][j]) for j in range(b)] for i in range(b)]
    batch_votes = [sum(x for x in sem[i] if x >= threshold) for i in range(b)]
    queue_votes = [sum(semq[i][j] for j in range(k) if v["queue_valid"][j] and semq[i][j] >= threshold)
                   for i in range(b)]
    rows = [(s[i][i], [(s[i][j], sem[i][j]) for j in range(b) if ids[j] != ids[i]], batch_votes[i]) for i in range(b)]
    cols = [(s[j][j], [(s[i][j], sem[j][i]) for i in range(b) if ids[i] != ids[j]], batch_votes[j]) for j in range(b)]

    def queue(query, key, bank):
        return [(dot(query[q], key[q]),
                 [(dot(query[q], bank[j]), semq[q][j]) for j in range(k)
                  if v["queue_valid"][j] and (keep or v["queue_ids"][j] != ids[q])], queue_votes[q])
                for q in range(b)]

    return rows, cols, queue(v["img"], v["txt_key"], v["txt_queue"]), queue(v["txt"], v["img_key"], v["img_queue"])


def tolerate(negatives: list[tuple[float, float]], tolerance: str, q: float) -> list[tuple[float, float]]:
    """(score, weight of its exp-term) of the negatives that stay."""
    if tolerance == "soft":
        return [(score, 1.0 - clip01(s)) for score, s in negatives]
    if tolerance == "quantile" and negatives:
        d = [1.0 - clip01(s) for _, s in negatives]
        threshold = float(np.quantile(np.array(d), q))
        return [(score, 1.0) for (score, _), dist in zip(negatives, d) if dist >= threshold]
    return [(score, 1.0) for score, _ in negatives]


def balance_weights(votes: list[float], balance: bool) -> list[float]:
    low, high = min(votes), max(votes)
    if not balance or high == low:
        return [1.0] * len(votes)
    return [1.0 - (v - low) / (high - low) for v in votes]


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def ref_loss(x, name: str, tolerance: str, q: float, balance: bool, threshold: float, keep: bool):
    """(batch, [queue_i2t, queue_t2i]) by the formulas of the module docstring, written out per query."""
    terms = ref_terms(x, keep, threshold)

    def negative(negs) -> float:  # UTO's (1/mu) log(1 + sum_k w_k exp(mu (s_k - gamma)))
        return math.log(1.0 + sum(w * math.exp(MU * (n - GAMMA)) for n, w in tolerate(negs, tolerance, q))) / MU

    def per_query(p: float, negs) -> float:
        if name == "uto":
            return negative(negs) - math.log(1.0 + max(p, 0.0))
        kept = tolerate(negs, tolerance, q)
        pos = math.exp(SCALE * p)
        return -math.log(pos / (pos + sum(w * math.exp(SCALE * n) for n, w in kept)))

    def term(queries) -> float:
        a = balance_weights([vote for _, _, vote in queries], balance)
        return weighted_mean([per_query(p, negs) for p, negs, _ in queries], a)

    rows, cols, q_i2t, q_t2i = terms
    if name == "uto":
        a_rows = balance_weights([vote for _, _, vote in rows], balance)
        a_cols = balance_weights([vote for _, _, vote in cols], balance)
        batch = (weighted_mean([negative(n) for _, n, _ in rows], a_rows)
                 + weighted_mean([negative(n) for _, n, _ in cols], a_cols)
                 - weighted_mean([math.log(1.0 + max(p, 0.0)) for p, _, _ in rows], a_rows))
    else:
        batch = term(rows) + term(cols)
    return batch, [term(q_i2t), term(q_t2i)]


def make_loss(name: str, **kwargs):
    if name == "uto":
        return UTOLoss(mu=MU, gamma=GAMMA, **kwargs)
    loss = InfoNCELoss(learnable=False, **kwargs).double()
    loss.log_scale.fill_(math.log(SCALE))  # the float32 initial value, exactly in double
    return loss


# ---------------------------------------------------------------- each rule against the loops

@pytest.mark.parametrize("name", ["uto", "infonce"])
@pytest.mark.parametrize("tolerance,q", [("none", 0.0), ("quantile", 0.01), ("quantile", 0.4), ("soft", 0.0)])
@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("mode", ["mask", "keep"])
def test_tolerant_losses_match_loops(name, tolerance, q, balance, mode):
    threshold = 0.3
    for seed in range(3):
        x = make_inputs(seed)
        loss = make_loss(name, tolerance=tolerance, tolerance_q=q, balance=balance, balance_threshold=threshold,
                         queue_false_negatives=mode, batch_weight=2.0)
        out = loss(**x)
        batch, queue = ref_loss(x, name, tolerance, q, balance, threshold, keep=mode == "keep")
        assert out["batch"].item() == pytest.approx(batch, rel=1e-10, abs=1e-12)
        assert out["queue_i2t"].item() == pytest.approx(queue[0], rel=1e-10, abs=1e-12)
        assert out["queue_t2i"].item() == pytest.approx(queue[1], rel=1e-10, abs=1e-12)
        assert out["loss"].item() == pytest.approx(2.0 * batch + sum(queue), rel=1e-10, abs=1e-12)


def test_the_rules_change_the_loss_on_these_inputs():
    """The cases above are not vacuous: each rule moves each term."""
    x = make_inputs(0)
    for name in ("uto", "infonce"):
        plain = make_loss(name)(**x)
        for kwargs in ({"tolerance": "quantile", "tolerance_q": 0.4}, {"tolerance": "soft"}, {"balance": True}):
            out = make_loss(name, **kwargs)(**x)
            for key in ("batch", "queue_i2t", "queue_t2i"):
                assert out[key].item() != pytest.approx(plain[key].item(), rel=1e-6), (name, kwargs, key)


@pytest.mark.parametrize("name", ["uto", "infonce"])
def test_off_is_the_current_loss_exactly(name):
    """Off (the default), semantic inputs are ignored; quantile at q = 0 drops nothing: both bit-identical."""
    x = make_inputs(3)
    plain_inputs = {k: v for k, v in x.items() if k not in ("semantic", "queue_semantic")}
    reference = make_loss(name)(**plain_inputs)
    for loss in (make_loss(name), make_loss(name, tolerance="quantile", tolerance_q=0.0)):
        out = loss(**x)
        assert set(out) == set(reference)
        for key in reference:
            assert torch.equal(out[key], reference[key]), key
    assert not make_loss(name).needs_semantic


def test_positive_and_same_id_items_are_never_dropped_nor_weighted():
    """Every vector the same image (s = 1 everywhere): soft weights are 0, so only the positive is left: UTO's
    negative part vanishes and InfoNCE is log(1) = 0; same-id batch pairs still get no gradient."""
    x = make_inputs(4)
    x["semantic"] = torch.ones_like(x["semantic"])
    x["queue_semantic"] = torch.ones_like(x["queue_semantic"])
    uto = make_loss("uto", tolerance="soft")(**x)
    positives = torch.log1p(F.relu((x["img"] * x["txt"]).sum(1))).mean()
    assert uto["batch"].item() == pytest.approx(-positives.item(), rel=1e-12)
    assert make_loss("infonce", tolerance="soft")(**x)["loss"].item() == pytest.approx(0.0, abs=1e-12)

    ids = x["image_ids"]
    same = ids[:, None] == ids[None, :]
    s = semantic_similarity(make_inputs(5)["semantic"])
    negatives = ~same
    for q in (0.01, 0.5, 0.9):
        assert not (quantile_drop_mask(s, q, negatives) & ~negatives).any()
    assert (soft_negative_weights(s, negatives)[~negatives] == 1.0).all()

    y = make_inputs(5)
    sim = (0.3 * torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.3)
    txt = sim.T.clone().requires_grad_(True)
    # (balancing is left off here: it gives the most popular query weight 0, its positive included, by design)
    for loss in (make_loss("uto", tolerance="quantile", tolerance_q=0.3), make_loss("infonce", tolerance="soft")):
        txt.grad = None
        loss(torch.eye(5, dtype=torch.float64), txt, ids, semantic=y["semantic"])["loss"].backward()
        grad = txt.grad.T  # dL/dS
        assert (grad[same & ~torch.eye(5, dtype=torch.bool)] == 0).all()
        assert (grad.diagonal() < 0).all()


def test_semantic_vectors_receive_no_gradient():
    x = make_inputs(6)
    for name in ("img", "semantic", "queue_semantic"):
        x[name].requires_grad_(True)
    make_loss("uto", tolerance="soft", balance=True)(**x)["loss"].backward()
    assert x["img"].grad.abs().sum() > 0
    assert x["semantic"].grad is None and x["queue_semantic"].grad is None


@pytest.mark.parametrize("kwargs", [{"tolerance": "quantile", "tolerance_q": 0.4, "balance": True},
                                    {"tolerance": "soft", "balance": True}])
@pytest.mark.parametrize("name", ["uto", "infonce"])
def test_two_ranks_mean_is_the_one_process_loss_and_gradient(name, kwargs):
    """Two ranks of 3 pairs each (GlobalBatch of 6, semantic gathered): the mean of the ranks' losses and its
    gradient equal the one-process loss of all 6 pairs, balancing normalised over every rank's queries."""
    ids = [0, 1, 1, 2, 3, 4]
    x = make_inputs(7, ids)
    loss = make_loss(name, **kwargs)
    img, txt = x["img"].clone().requires_grad_(True), x["txt"].clone().requires_grad_(True)
    single = loss(**{**x, "img": img, "txt": txt})
    single["loss"].backward()
    expected_grads = img.grad.clone(), txt.grad.clone()
    img.grad = txt.grad = None
    total = {}
    for rank in range(2):
        rows = slice(3 * rank, 3 * rank + 3)
        world = GlobalBatch(img, txt, x["image_ids"], 3 * rank, 2, x["semantic"])
        local = {key: (value[rows] if key in ("image_ids", "img_key", "txt_key", "semantic") else value)
                 for key, value in x.items()}
        out = loss(**{**local, "img": img[rows], "txt": txt[rows]}, global_batch=world)
        for key, value in out.items():
            total[key] = total.get(key, 0.0) + value / 2
    total["loss"].backward()
    for key in single:
        assert total[key].item() == pytest.approx(single[key].item(), rel=1e-12), key
    torch.testing.assert_close(img.grad, expected_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(txt.grad, expected_grads[1], rtol=1e-10, atol=1e-12)


def test_missing_semantic_inputs_are_named():
    x = make_inputs(8)
    loss = make_loss("uto", tolerance="soft")
    with pytest.raises(DataError, match="needs semantic"):
        loss(**{**x, "semantic": None})
    with pytest.raises(DataError, match="queue_semantic"):
        loss(**{**x, "queue_semantic": None})
    with pytest.raises(DataError, match="semantic vectors have shape"):
        loss(**{**x, "semantic": x["semantic"][:3]})
    with pytest.raises(DataError, match="global_batch.semantic"):
        loss(x["img"], x["txt"], x["image_ids"], global_batch=GlobalBatch(x["img"], x["txt"], x["image_ids"], 0, 1))
    zero = x["queue_semantic"].clone()
    zero[0] = 0.0  # a valid slot without a vector
    with pytest.raises(DataError, match="row 0 has zero norm"):
        loss(**{**x, "queue_semantic": zero})


# ---------------------------------------------------------------- the shared weights, rectangular

def test_rectangular_weights_match_loops():
    g = torch.Generator().manual_seed(9)
    z, c = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    valid = torch.tensor([True] * 5 + [False] * 2)
    c[~valid] = 0.0
    s = semantic_similarity(z, c, valid)
    for i in range(4):
        for j in range(7):
            expected = 0.0 if j >= 5 else dot(z[i].tolist(), c[j].tolist()) / (z[i].norm() * c[j].norm()).item()
            assert s[i, j].item() == pytest.approx(expected, abs=1e-12)
    negatives = torch.rand(4, 7, generator=g) < 0.7
    negatives[:, 5:] = False
    negatives[3] = False  # a query without negatives
    for q in (0.0, 0.2, 0.6):
        drop = quantile_drop_mask(s, q, negatives)
        thresholds = row_quantile(1.0 - s.clamp(0, 1), q, negatives)
        for i in range(4):
            d = [1.0 - clip01(s[i, j].item()) for j in range(7) if negatives[i, j]]
            if not d:
                assert thresholds[i].item() == math.inf and not drop[i].any()
                continue
            threshold = float(np.quantile(np.array(d), q))
            assert thresholds[i].item() == pytest.approx(threshold, abs=1e-12)
            assert drop[i].tolist() == [bool(negatives[i, j]) and 1.0 - clip01(s[i, j].item()) < threshold
                                        for j in range(7)]
    w = soft_negative_weights(s, negatives)
    assert torch.equal(w[~negatives], torch.ones_like(w[~negatives]))
    torch.testing.assert_close(w[negatives], 1.0 - s[negatives].clamp(0, 1))
    votes = [sum(s[i, j].item() for j in range(5) if s[i, j] >= 0.1) for i in range(4)]
    low, high = min(votes), max(votes)
    assert class_balance_weights(s, 0.1, valid).tolist() == pytest.approx(
        [1.0 - (v - low) / (high - low) for v in votes], rel=1e-12)
    with pytest.raises(DataError, match="square"):
        quantile_drop_mask(s, 0.1)
    with pytest.raises(DataError, match="negatives must be a bool"):
        soft_negative_weights(s, negatives.long())


# ---------------------------------------------------------------- the model: semantic queue, one step

TOLERANT = RetrievalLossConfig(mu=MU, gamma=GAMMA, tolerance="quantile", tolerance_q=0.25, balance=True,
                               balance_threshold=0.2)


def pooled_regions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    rows = [batch["regions"][b, :n].mean(0) for b, n in enumerate(batch["region_lengths"].tolist())]
    return F.normalize(torch.stack(rows), dim=1)


def train_step(model: USERModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> dict:
    optimizer.zero_grad()
    losses = model(batch)
    losses["loss"].backward()
    optimizer.step()
    model.momentum_step()
    return losses


def test_semantic_queue_is_aligned_with_the_id_queue_and_round_trips():
    torch.manual_seed(10)
    model = USERModel(model_config(), TOLERANT, vocab_size=VOCAB).train()
    assert model.semantic_queue is not None and model.semantic_queue.keys.shape == (8, REGION_DIM)
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-2))
    expected = {}
    for seed in range(3):  # 3 x 4 items into a queue of 8: wraps around
        batch = region_batch(seed=seed, lengths=[5, 2, 4, 1])
        for image_id, vector in zip(batch["image_ids"].tolist(), pooled_regions(batch)):
            expected[image_id] = vector
        train_step(model, optimizer, batch)
    queue = model.semantic_queue
    assert torch.equal(queue.ids, model.image_queue.ids) and torch.equal(queue.ptr, model.image_queue.ptr)
    assert int(queue.filled) == 8
    for slot, image_id in enumerate(queue.ids.tolist()):
        torch.testing.assert_close(queue.keys[slot], expected[image_id])
    state = copy.deepcopy(model.state_dict())
    assert {"semantic_queue.keys", "semantic_queue.ids", "semantic_queue.ptr", "semantic_queue.filled"} <= set(state)
    restored = USERModel(model_config(), TOLERANT, vocab_size=VOCAB)
    restored.load_state_dict(state)
    for name in ("keys", "ids", "ptr", "filled"):
        assert torch.equal(getattr(restored.semantic_queue, name), getattr(queue, name))
    model.eval(), restored.eval()
    batch = region_batch(seed=9)
    torch.testing.assert_close(restored(batch)["loss"], model(batch)["loss"])
    # off: no semantic queue in the state, so checkpoints from before the switch still load
    plain = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB)
    assert plain.semantic_queue is None and not any(k.startswith("semantic_queue") for k in plain.state_dict())
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("semantic_queue")})


@pytest.mark.parametrize("loss_cfg,use_queue", [
    (TOLERANT, True),
    (RetrievalLossConfig(name="infonce", tolerance="soft", balance=True), True),
    (RetrievalLossConfig(name="infonce", tolerance="soft"), False),
], ids=["uto_quantile_balance", "infonce_soft_balance", "infonce_soft_noqueue"])
def test_a_tolerant_training_step_is_the_loss_called_by_hand(loss_cfg, use_queue):
    """Step 1 fills the queue; step 2's losses equal the loss module called on the same embeddings, keys, queue
    snapshot and semantic vectors (region means); then it trains."""
    torch.manual_seed(11)
    model = USERModel(model_config(use_queue=use_queue), loss_cfg, vocab_size=VOCAB).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-2))
    train_step(model, optimizer, region_batch(seed=0))
    batch = region_batch(seed=1, lengths=[5, 3, 5, 2])
    batch["image_ids"] = torch.tensor([10, 11, 0, 11])  # a repeated image, and one already in the queue
    reference = build_loss(loss_cfg)
    reference.load_state_dict(model.loss.state_dict())
    state = copy.deepcopy(model.state_dict())
    img = model.image_encoder(batch["regions"], batch["region_lengths"])
    txt = model.text_encoder(batch["tokens"], batch["token_lengths"])
    extra = {}
    if use_queue:
        with torch.no_grad():
            img_key = model.image_key_encoder(batch["regions"], batch["region_lengths"])
            txt_key = model.text_key_encoder(batch["tokens"], batch["token_lengths"])
        extra = dict(img_key=img_key, txt_key=txt_key, img_queue=model.image_queue.keys.clone(),
                     txt_queue=model.text_queue.keys.clone(), queue_ids=model.image_queue.ids.clone(),
                     queue_valid=model.image_queue.valid_mask(), queue_semantic=model.semantic_queue.keys.clone())
    expected = reference(img, txt, batch["image_ids"], semantic=pooled_regions(batch), **extra)
    model.load_state_dict(state)  # the hand-run encoders moved BatchNorm statistics
    losses = train_step(model, optimizer, batch)
    assert set(losses) == set(expected)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key])
    assert torch.isfinite(losses["loss"])
    assert model.image_encoder.head.fc.weight.grad.abs().sum() > 0
    if use_queue:
        assert int(model.semantic_queue.filled) == 8
        torch.testing.assert_close(model.semantic_queue.keys[4:], pooled_regions(batch))
        assert model.semantic_queue.ids[4:].tolist() == batch["image_ids"].tolist()


def test_clip_source_reads_clip_image_and_frozen_backbone_pools_its_grid():
    torch.manual_seed(12)
    clip_cfg = RetrievalLossConfig(tolerance="soft", semantic_source="clip")
    model = USERModel(model_config(cge=True, clip_dim=6), clip_cfg, vocab_size=VOCAB).train()
    assert model.semantic_queue.keys.shape == (8, 6)
    batch = region_batch()
    batch["clip_image"] = torch.randn(4, 6)
    batch["clip_text"] = torch.randn(4, 6)
    torch.testing.assert_close(model.semantic_vectors(batch), F.normalize(batch["clip_image"], dim=1))
    model(batch)["loss"].backward()
    torch.testing.assert_close(model.semantic_queue.keys[:4], F.normalize(batch["clip_image"], dim=1))

    frozen = USERModel(model_config(image_input="images", backbone="resnet18", backbone_weights=None,
                                   backbone_trainable="frozen", use_queue=False),
                       RetrievalLossConfig(balance=True), vocab_size=VOCAB).train()
    images = region_batch(num=3)
    del images["regions"], images["region_lengths"]
    images["images"] = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        grid = frozen.image_encoder.backbone(images["images"])
    torch.testing.assert_close(frozen.semantic_vectors(images), F.normalize(grid.mean(dim=(2, 3)), dim=1))
    assert torch.isfinite(frozen(images)["loss"])


# ---------------------------------------------------------------- the config switch

def test_config_switch_defaults_off_and_errors_name_the_key():
    cfg = load_config(RetrievalTrainConfig, None, [])
    assert (cfg.loss.tolerance, cfg.loss.balance, cfg.loss.semantic_source) == ("none", False, "regions")
    assert not build_loss(cfg.loss).needs_semantic
    on = load_config(RetrievalTrainConfig, None, ["loss.tolerance=quantile", "loss.tolerance_q=0.05",
                                                  "loss.balance=true", "loss.balance_threshold=0.4"])
    loss = build_loss(on.loss)
    assert (loss.tolerance, loss.tolerance_q, loss.balance, loss.balance_threshold) == ("quantile", 0.05, True, 0.4)
    cases = [
        (["loss.tolerance=hard"], "loss.tolerance"),
        (["loss.tolerance_q=1.0"], "loss.tolerance_q"),
        (["loss.balance_threshold=1.5"], "loss.balance_threshold"),
        (["loss.semantic_source=text"], "loss.semantic_source"),
        (["loss.name=hinge", "loss.tolerance=soft"], "loss.tolerance"),
        (["loss.name=hinge", "loss.balance=true"], "loss.balance"),
        (["loss.balance=true", "loss.semantic_source=clip"], "loss.semantic_source='clip'.*model.cge"),
        (["loss.tolerance=soft", "model.image_input=images"], "model.backbone_trainable='partial'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(RetrievalTrainConfig, None, overrides)
    with pytest.raises(ConfigError, match="loss.semantic_source='clip'"):
        USERModel(model_config(), RetrievalLossConfig(tolerance="soft", semantic_source="clip"), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="tolerance must be one of"):
        UTOLoss(tolerance="hard")
    with pytest.raises(ConfigError, match="does not take"):
        build_retrieval_loss("hinge", tolerance="soft")


@pytest.mark.slow
def test_a_tolerant_run_trains_resumes_and_evaluates_from_its_checkpoint(tmp_path):
    """Through the trainer: a tolerant USER run (quantile + balance, region means) stops after epoch 1 and resumes
    to the weights and semantic queue of an uninterrupted run; its checkpoint evaluates."""

    from xmcl.retrieval.inference import evaluate_checkpoint
    from xmcl.runtime.checkpoint import read_checkpoint
    from xmcl.training.retrieval_trainer import train_retrieval

    root = tmp_path / "corpus"
    root.mkdir()
    corpus = write_corpus(root, {"train": 20, "val": 6})
    switch = ["loss.tolerance=quantile", "loss.tolerance_q=0.2", "loss.balance=true"]
    straight = train_retrieval(retrieval_config(corpus, *switch), tmp_path / "straight", progress=False)
    train_retrieval(retrieval_config(corpus, *switch, "optim.epochs=1"), tmp_path / "split", progress=False)
    resumed = train_retrieval(retrieval_config(corpus, *switch), tmp_path / "split", progress=False)
    a, b = read_checkpoint(straight["last"])["model"], read_checkpoint(resumed["last"])["model"]
    assert a.keys() == b.keys() and "semantic_queue.keys" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["semantic_queue.ids"], a["image_queue.ids"])
    metrics = evaluate_checkpoint(straight["best"], None, "val", ("all",), device="cpu")["all"]
    assert 0.0 <= metrics.as_dict()["rsum"] <= 600.0


def test_uto_warm_up_hinge_is_plain_and_the_semantic_queue_still_fills():
    cfg = RetrievalLossConfig(tolerance="soft", balance=True, uto_warmup_epochs=1)
    torch.manual_seed(13)
    model = USERModel(model_config(), cfg, vocab_size=VOCAB).train()
    assert model.loss.needs_semantic and not model.loss.warmup.needs_semantic
    model.set_epoch(0)  # the hinge: semantic inputs ignored
    batch = region_batch()
    plain = USERModel(model_config(), RetrievalLossConfig(uto_warmup_epochs=1), vocab_size=VOCAB).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("semantic_queue")})
    plain.set_epoch(0)
    torch.testing.assert_close(model(batch)["loss"], plain(batch)["loss"], rtol=0, atol=0)
    assert int(model.semantic_queue.filled) == 4
    model.set_epoch(1)  # tolerant UTO from here
    assert torch.isfinite(model(region_batch(seed=1))["loss"])
