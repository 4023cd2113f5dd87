"""Image-text retrieval losses over a batch and an optional momentum queue: UTO (USER), VSE++ hinge, InfoNCE.

Shared contract
---------------
``img`` (B x d) and ``txt`` (B x d) are L2-normalised embeddings of B image-caption pairs; row b of both is one
pair. ``image_ids`` (B,) integer: items with equal image id are positives of each other and never negatives (a
batch may hold several captions of one image). S = img @ txt.T.

Every loss is built from one *directional* term over Q queries: each query q has a positive score p_q and
candidate scores s_qk with a boolean negative mask N_qk (True = counts as a negative).

- batch: image queries (rows of S, p = diag S, N = ids differ) and text queries (columns of S, same mask).
- queue (when ``txt_queue``/``img_queue`` are given): image query v_q against the text queue with positive
  v_q . t_k, where t_k = ``txt_key[q]`` is the momentum (key) encoder's embedding of its paired caption;
  symmetrically text queries against the image queue with ``img_key``. A queue entry is a negative when it is
  valid (``queue_valid``) and, with ``queue_false_negatives="mask"``, its id differs from the query's image id;
  ``"keep"`` counts same-id entries as negatives (what the USER authors' code does).
  The two queues are written together (paired keys), so they share ``queue_ids`` and ``queue_valid``.

total = batch_weight * batch + queue_i2t + queue_t2i; ``forward`` returns ``{"loss", "batch"}`` plus
``"queue_i2t"`` and ``"queue_t2i"`` when a queue is given. Queues and keys are detached inside the loss: no
gradient reaches the key encoder.

Data parallel (``global_batch``): with W ranks of B pairs each, this rank's B image and B text queries are scored
against the G = W B candidates of every rank (gathered with gradient, rank order), the local-loss form: the mean
over ranks of the ranks' losses is the one-process loss of the G pairs, and so are the averaged gradients. A loss
that sums over queries (``sums_over_queries``: the hinge) multiplies its rank loss by W for that to hold.

Semantic tolerance (UTO and InfoNCE; the project's extension beyond USER, after ST-SLidR)
--------------------------------------------------------------------------------------
Off by default (``tolerance="none"``, ``balance=False``): the losses above, unchanged. On, each item carries
``semantic`` z_b (B x c), a frozen feature of its *image* (for a caption, its pair's image), and the queue a
``queue_semantic`` (K x c) row per slot, written with the keys. Per term, s_qk = cos(z_q, z_k) between query q's
image and candidate k's image (``semantic_weights.semantic_similarity``); the batch term's image and text
queries share one s (B x G), so do the two queue directions (B x K). With N_qk the negative mask above:

- ``"quantile"``: N_qk <- N_qk and not D_qk, D = ``quantile_drop_mask(s, q, N)``: d_qk = 1 - clip(s_qk, 0, 1)
  strictly below the q-quantile of {d_qk : N_qk} leaves the negatives;
- ``"soft"``: each negative's exp-term is weighted by w_qk = 1 - clip(s_qk, 0, 1) (``soft_negative_weights``):
  UTO's (1/mu) log(1 + sum_k w_qk exp(mu (s_qk - gamma))), InfoNCE's exp(scale p_q) + sum_k w_qk exp(scale s_qk),
  both evaluated as logsumexp(x + log w);
- ``balance``: a_q = ``class_balance_weights(s, threshold, candidates)``, votes over every in-batch item (the
  query's own included) or every valid queue slot, min-max over the term's queries; every mean over queries of
  the term (UTO's positive part included) becomes sum_q a_q l_q / sum_q a_q.

The positive p_q is never dropped nor weighted. Data parallel: ``GlobalBatch.semantic`` (G x c, gathered
without gradient) gives the candidates' vectors and, for balancing, the votes of all G queries, normalised over
all of them, so the mean of the ranks' losses stays the one-process loss.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.contrast.semantic_weights import (
    class_balance_weights,
    quantile_drop_mask,
    semantic_similarity,
    soft_negative_weights,
)
from xmcl.errors import ConfigError, DataError
from xmcl.nn.dense import linear

QUEUE_FALSE_NEGATIVE_MODES = ("mask", "keep")
TOLERANCES = ("none", "quantile", "soft")


@dataclass
class GlobalBatch:
    """The embeddings and image ids of every rank's batch, in rank order (this rank's rows at ``offset``), and the
    number of ranks: the in-batch candidates of a data-parallel step; ``semantic``, every rank's semantic vectors
    (gathered without gradient), when the loss is semantically tolerant."""

    img: Tensor
    txt: Tensor
    image_ids: Tensor
    offset: int
    world_size: int
    semantic: Tensor | None = None


class RetrievalLoss(nn.Module):
    """Base class: input checks, masks, batch and queue terms; subclasses define ``directional``."""

    sums_over_queries = False  # True where ``directional`` sums (not averages) over its queries

    def __init__(self, batch_weight: float = 1.0, queue_false_negatives: str = "mask", tolerance: str = "none",
                 tolerance_q: float = 0.01, balance: bool = False, balance_threshold: float = 0.5) -> None:
        super().__init__()
        if batch_weight < 0:
            raise ConfigError(f"batch_weight must be >= 0, got {batch_weight}")
        if queue_false_negatives not in QUEUE_FALSE_NEGATIVE_MODES:
            raise ConfigError(
                f"queue_false_negatives must be one of {QUEUE_FALSE_NEGATIVE_MODES}, got '{queue_false_negatives}'"
            )
        if tolerance not in TOLERANCES:
            raise ConfigError(f"tolerance must be one of {TOLERANCES}, got '{tolerance}'")
        if not 0.0 <= tolerance_q < 1.0:
            raise ConfigError(f"tolerance_q must be in [0, 1), got {tolerance_q}")
        if not -1.0 <= balance_threshold <= 1.0:
            raise ConfigError(f"balance_threshold must be a cosine in [-1, 1], got {balance_threshold}")
        self.batch_weight = float(batch_weight)
        self.queue_false_negatives = queue_false_negatives
        self.tolerance = tolerance
        self.tolerance_q = float(tolerance_q)
        self.balance = bool(balance)
        self.balance_threshold = float(balance_threshold)

    @property
    def needs_semantic(self) -> bool:
        """Whether ``forward`` needs ``semantic`` (and ``queue_semantic`` with a queue)."""
        return self.tolerance != "none" or self.balance

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (also after a resume); no-op unless overridden."""

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor, log_weights: Tensor | None = None,
                    query_weights: Tensor | None = None) -> Tensor:
        """Scalar loss of Q queries: ``scores`` (Q x N), ``positives`` (Q,), ``negatives`` (Q x N) bool;
        tolerant terms add ``log_weights`` (Q x N) log w_qk of each negative's exp-term and ``query_weights``
        (Q,), the balancing weights a_q scaled to mean 1 over all queries of the term (all ranks)."""
        raise NotImplementedError

    def batch_term(self, i2t: Tensor, t2i: Tensor, positives: Tensor, negatives: Tensor,
                   log_weights: Tensor | None = None, query_weights: Tensor | None = None) -> Tensor:
        """Image-to-text plus text-to-image directional terms: ``i2t`` (B x G) scores of the image queries against
        the candidate captions, ``t2i`` (B x G) of the text queries against the candidate images, ``positives`` (B,)
        the pairs' scores, ``negatives`` (B x G) the mask of candidates with another image id (both directions
        share it, and ``log_weights`` / ``query_weights``)."""
        return (self.directional(i2t, positives, negatives, log_weights, query_weights)
                + self.directional(t2i, positives, negatives, log_weights, query_weights))

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        image_ids: Tensor,
        img_key: Tensor | None = None,
        txt_key: Tensor | None = None,
        img_queue: Tensor | None = None,
        txt_queue: Tensor | None = None,
        queue_ids: Tensor | None = None,
        queue_valid: Tensor | None = None,
        global_batch: GlobalBatch | None = None,
        semantic: Tensor | None = None,
        queue_semantic: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The loss dict; ``semantic`` (B x c) and ``queue_semantic`` (K x c) are read only when
        ``needs_semantic`` (with ``global_batch``, its ``semantic`` replaces ``semantic``)."""
        _check_batch(img, txt, image_ids)
        queries = self._semantic_queries(img, semantic, global_batch) if self.needs_semantic else None
        if global_batch is None:
            sim = img @ txt.T
            i2t, t2i, positives, rows = sim, sim.T, sim.diagonal(), slice(0, img.shape[0])
            negatives = image_ids[:, None] != image_ids[None, :]
        else:
            i2t = img @ global_batch.txt.T
            local = torch.arange(img.shape[0], device=img.device)
            t2i, positives = txt @ global_batch.img.T, i2t[local, global_batch.offset + local]
            rows = slice(global_batch.offset, global_batch.offset + img.shape[0])
            negatives = image_ids[:, None] != global_batch.image_ids[None, :]
        tolerant = {}
        if queries is not None:
            tolerant = self._tolerant(semantic_similarity(queries), rows, negatives, None)
            negatives = tolerant.pop("negatives")
        batch = self.batch_term(i2t, t2i, positives, negatives, **tolerant)
        out = {"batch": batch}
        loss = self.batch_weight * batch
        if img_queue is not None or txt_queue is not None:
            negatives, queue_valid = self._queue_negatives(img, img_key, txt_key, img_queue, txt_queue, image_ids,
                                                           queue_ids, queue_valid)
            tolerant = {}
            if queries is not None:
                if queue_semantic is None:
                    raise DataError(f"tolerance='{self.tolerance}', balance={self.balance} with a queue needs "
                                    "queue_semantic (the semantic vectors of the queued items)")
                s = semantic_similarity(queries, queue_semantic, queue_valid)
                tolerant = self._tolerant(s, rows, negatives, queue_valid)
                negatives = tolerant.pop("negatives")
            img_key, txt_key = img_key.detach(), txt_key.detach()
            # against the queue (K, d) as a weight: x Q^T through nn.dense (oneDNN on the CPU)
            out["queue_i2t"] = self.directional(linear(img, txt_queue.detach()), (img * txt_key).sum(1), negatives,
                                                **tolerant)
            out["queue_t2i"] = self.directional(linear(txt, img_queue.detach()), (txt * img_key).sum(1), negatives,
                                                **tolerant)
            loss = loss + out["queue_i2t"] + out["queue_t2i"]
        out["loss"] = loss
        if global_batch is not None and self.sums_over_queries:
            out = {name: value * global_batch.world_size for name, value in out.items()}
        return out

    def _queue_negatives(
        self,
        img: Tensor,
        img_key: Tensor | None,
        txt_key: Tensor | None,
        img_queue: Tensor | None,
        txt_queue: Tensor | None,
        image_ids: Tensor,
        queue_ids: Tensor | None,
        queue_valid: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Check the queue inputs; the (B x K) mask of queue entries that are negatives and the (K,) valid mask."""
        if img_queue is None or txt_queue is None:
            raise DataError("the queue term needs both img_queue and txt_queue")
        if img_key is None or txt_key is None:
            raise DataError("the queue term needs img_key and txt_key (momentum embeddings of the batch)")
        for name, key in (("img_key", img_key), ("txt_key", txt_key)):
            if key.shape != img.shape:
                raise DataError(f"{name} has shape {tuple(key.shape)}, expected {tuple(img.shape)} like img")
        if img_queue.dim() != 2 or img_queue.shape[1] != img.shape[1] or txt_queue.shape != img_queue.shape:
            raise DataError(f"img_queue {tuple(img_queue.shape)} and txt_queue {tuple(txt_queue.shape)} "
                            f"must both be (K x {img.shape[1]})")
        size = img_queue.shape[0]
        if queue_valid is None:
            queue_valid = torch.ones(size, dtype=torch.bool, device=img.device)
        elif queue_valid.shape != (size,) or queue_valid.dtype != torch.bool:
            raise DataError(f"queue_valid must be a bool tensor of shape ({size},), "
                            f"got {queue_valid.dtype} {tuple(queue_valid.shape)}")
        negatives = queue_valid[None, :].expand(img.shape[0], size)
        if self.queue_false_negatives == "mask":
            if queue_ids is None:
                raise DataError("queue_false_negatives='mask' needs queue_ids")
            if queue_ids.shape != (size,):
                raise DataError(f"queue_ids has shape {tuple(queue_ids.shape)}, expected ({size},)")
            negatives = negatives & (queue_ids[None, :] != image_ids[:, None])
        return negatives, queue_valid

    def _semantic_queries(self, img: Tensor, semantic: Tensor | None, global_batch: GlobalBatch | None) -> Tensor:
        """The semantic vectors of every query of the step (G x c; B x c in one process), checked."""
        needs = f"tolerance='{self.tolerance}', balance={self.balance} needs"
        if global_batch is not None:
            rows = global_batch.img.shape[0]
            if global_batch.semantic is None:
                raise DataError(f"{needs} global_batch.semantic (every rank's semantic vectors)")
            semantic = global_batch.semantic
        else:
            rows = img.shape[0]
            if semantic is None:
                raise DataError(f"{needs} semantic (B x c: a frozen feature of each pair's image)")
        if semantic.dim() != 2 or semantic.shape[0] != rows:
            raise DataError(f"semantic vectors have shape {tuple(semantic.shape)}, expected ({rows} x c)")
        return semantic

    def _tolerant(self, s: Tensor, rows: slice, negatives: Tensor, voters: Tensor | None) -> dict[str, Tensor]:
        """One term's ``negatives`` after dropping, ``log_weights`` and ``query_weights`` (those in use) from the
        semantic similarities ``s`` of all the step's queries (G x N; this rank's at ``rows``) to the candidates;
        ``voters`` (N,) the candidates that vote for balancing (None = all)."""
        out = {}
        local = s[rows]
        if self.tolerance == "quantile":
            negatives = negatives & ~quantile_drop_mask(local, self.tolerance_q, negatives)
        elif self.tolerance == "soft":
            out["log_weights"] = soft_negative_weights(local, negatives).log()
        if self.balance:
            weights = class_balance_weights(s, self.balance_threshold, voters)
            out["query_weights"] = (weights * (weights.shape[0] / weights.sum()))[rows]
        return {"negatives": negatives, **out}


class UTOLoss(RetrievalLoss):
    """USER's Unified Training Objective (Zhang et al., TIP 2024).

    With LSE0(x) = log(1 + sum_k exp(x_k)) (evaluated as logsumexp over [0, x...], stable at mu = 90):

    batch = mean_i (1/mu) LSE0(mu (S_ij - gamma), j in neg(i))          image -> text
          + mean_j (1/mu) LSE0(mu (S_ij - gamma), i in neg(j))          text -> image
          - mean_i log(1 + relu(S_ii))                                  (the positive counted once)
    queue, per direction: mean_q [(1/mu) LSE0(mu (s_qk - gamma), k negative) - log(1 + relu(p_q))].

    Relation to the authors' code (``lib/loss.py``, ``UTO.forward``/``moco_forward``): same terms, same
    averaging (sums over queries divided by the batch size, i.e. means over queries; the positive appears once
    in the batch term and once per queue direction), ``loss_lamda`` is our ``batch_weight`` (1 for COCO, 20 for
    Flickr30K in their scripts). Differences: they zero the diagonal of S instead of removing it (it then adds
    exp(-mu gamma) ~ 3e-20 to each sum), count other captions of the same image in the batch as negatives,
    count every queue slot (their queue starts as random vectors), and evaluate exp naively; we remove same-id
    items from the batch negatives, skip empty queue slots, and mask same-id queue entries unless
    ``queue_false_negatives="keep"``.
    Tolerant (see the module docstring): w_qk inside the sum, (1/mu) log(1 + sum_k w_qk exp(mu (s_qk - gamma))),
    and every mean_q above (the positive part's included) becomes sum_q a_q (.) / sum_q a_q.
    """

    def __init__(self, mu: float = 90.0, gamma: float = 0.5, batch_weight: float = 1.0,
                 queue_false_negatives: str = "mask", tolerance: str = "none", tolerance_q: float = 0.01,
                 balance: bool = False, balance_threshold: float = 0.5) -> None:
        super().__init__(batch_weight, queue_false_negatives, tolerance, tolerance_q, balance, balance_threshold)
        if mu <= 0:
            raise ConfigError(f"UTO mu must be > 0, got {mu}")
        self.mu = float(mu)
        self.gamma = float(gamma)

    def _negative_part(self, scores: Tensor, negatives: Tensor, log_weights: Tensor | None = None) -> Tensor:
        """(Q,) (1/mu) log(1 + sum_{k negative} w_qk exp(mu (s_qk - gamma))), w = exp(log_weights) (None: 1)."""
        x = self.mu * (scores - self.gamma)
        if log_weights is not None:
            x = x + log_weights
        x = x.masked_fill(~negatives, -math.inf)
        x = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
        return torch.logsumexp(x, dim=1) / self.mu

    @staticmethod
    def _positive_part(positives: Tensor) -> Tensor:
        """(Q,) log(1 + relu(p_q))."""
        return torch.log1p(F.relu(positives))

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor, log_weights: Tensor | None = None,
                    query_weights: Tensor | None = None) -> Tensor:
        return _mean(self._negative_part(scores, negatives, log_weights) - self._positive_part(positives),
                     query_weights)

    def batch_term(self, i2t: Tensor, t2i: Tensor, positives: Tensor, negatives: Tensor,
                   log_weights: Tensor | None = None, query_weights: Tensor | None = None) -> Tensor:
        return (_mean(self._negative_part(i2t, negatives, log_weights), query_weights)
                + _mean(self._negative_part(t2i, negatives, log_weights), query_weights)
                - _mean(self._positive_part(positives), query_weights))


class HingeLoss(RetrievalLoss):
    """VSE++ hinge (Faghri et al. 2018), as in VSE-infinity's ``ContrastiveLoss``.

    Per direction: sum_q sum_{k negative} [margin + s_qk - p_q]_+ during the first ``warmup_epochs`` epochs
    (VSE-infinity's ``vse_mean_warmup_epochs``), then sum_q max_{k negative} [margin + s_qk - p_q]_+ (hardest
    negative). Reduction is a sum over queries, as in VSE-infinity (learning rates there are tuned for it).
    Differences: same-id items are never negatives (VSE-infinity masks only the diagonal); the queue terms use
    the same rule with the momentum key as the positive. The trainer calls ``set_epoch`` every epoch.
    No semantic tolerance (it takes no ``tolerance``/``balance``): ``log_weights``/``query_weights`` stay None.
    """

    sums_over_queries = True

    def __init__(self, margin: float = 0.2, warmup_epochs: int = 1, batch_weight: float = 1.0,
                 queue_false_negatives: str = "mask") -> None:
        super().__init__(batch_weight, queue_false_negatives)
        if margin < 0:
            raise ConfigError(f"hinge margin must be >= 0, got {margin}")
        if warmup_epochs < 0:
            raise ConfigError(f"hinge warmup_epochs must be >= 0, got {warmup_epochs}")
        self.margin = float(margin)
        self.warmup_epochs = int(warmup_epochs)
        self.max_violation = warmup_epochs == 0

    def set_epoch(self, epoch: int) -> None:
        """Sum over negatives before ``warmup_epochs``, hardest negative from then on (epochs count from 0)."""
        self.max_violation = epoch >= self.warmup_epochs

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor, log_weights: Tensor | None = None,
                    query_weights: Tensor | None = None) -> Tensor:
        cost = (self.margin + scores - positives[:, None]).clamp(min=0).masked_fill(~negatives, 0.0)
        per_query = cost.max(dim=1).values if self.max_violation else cost.sum(dim=1)
        return per_query.sum()


class InfoNCELoss(RetrievalLoss):
    """Symmetric InfoNCE with a learnable temperature, as in CLIP (Radford et al. 2021).

    scale = exp(min(log_scale, log(max_scale))), log_scale initialised to log(1 / init_temperature).
    Per direction: mean_q -log( exp(scale p_q) / (exp(scale p_q) + sum_{k negative} exp(scale s_qk)) ).
    Same-id items other than the pair itself leave the denominators. The batch term is the sum of both
    directions (CLIP averages them, i.e. half of ours). CLIP clamps ``logit_scale`` in place after each optimiser
    step; we clamp in the forward pass (same effective scale; no gradient while at the cap). The trainer must
    hand ``loss.parameters()`` to the optimiser when ``learnable``.
    Tolerant (see the module docstring): exp(scale p_q) + sum_k w_qk exp(scale s_qk) in the denominator, and
    mean_q becomes sum_q a_q (.) / sum_q a_q.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True,
                 batch_weight: float = 1.0, queue_false_negatives: str = "mask", tolerance: str = "none",
                 tolerance_q: float = 0.01, balance: bool = False, balance_threshold: float = 0.5) -> None:
        super().__init__(batch_weight, queue_false_negatives, tolerance, tolerance_q, balance, balance_threshold)
        if init_temperature <= 0:
            raise ConfigError(f"InfoNCE init_temperature must be > 0, got {init_temperature}")
        if max_scale <= 0:
            raise ConfigError(f"InfoNCE max_scale must be > 0, got {max_scale}")
        self.max_log_scale = math.log(max_scale)
        log_scale = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def scale(self) -> Tensor:
        """The logit scale 1/t, capped at ``max_scale``."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor, log_weights: Tensor | None = None,
                    query_weights: Tensor | None = None) -> Tensor:
        scale = self.scale()
        pos = scale * positives
        neg = scale * scores
        if log_weights is not None:
            neg = neg + log_weights
        neg = neg.masked_fill(~negatives, -math.inf)
        return _mean(torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos, query_weights)


class WarmStartLoss(nn.Module):
    """``warmup`` for the first ``epochs`` epochs, then ``main`` (same call signature as a ``RetrievalLoss``).

    Why: UTO's positive term log(1 + relu(s_ii)) has no gradient where s_ii <= 0, and its negative term
    exp(mu (s - gamma)) vanishes far below gamma. Freshly initialised towers often embed every image near one
    direction and every caption near another; when the two point apart, all s_ii < 0 and UTO cannot start
    (observed on Flickr8K with the pretrained MiniLM, seed 0: loss exactly 0, gradient exactly 0). A short
    warm-up with a loss that always has a gradient (VSE++'s sum-of-violations hinge) aligns the towers first.
    """

    def __init__(self, main: RetrievalLoss, warmup: RetrievalLoss, epochs: int) -> None:
        super().__init__()
        if epochs < 0:
            raise ConfigError(f"warm-up epochs must be >= 0, got {epochs}")
        self.main, self.warmup, self.epochs = main, warmup, epochs
        self.epoch = 0

    @property
    def needs_semantic(self) -> bool:
        """The main loss's (the warm-up hinge is never tolerant and ignores semantic inputs)."""
        return self.main.needs_semantic

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.main.set_epoch(epoch)
        self.warmup.set_epoch(epoch)

    def forward(self, *args: Tensor | None, **kwargs: Tensor | None) -> dict[str, Tensor]:
        return (self.warmup if self.epoch < self.epochs else self.main)(*args, **kwargs)


RETRIEVAL_LOSSES: dict[str, type[RetrievalLoss]] = {"uto": UTOLoss, "hinge": HingeLoss, "infonce": InfoNCELoss}


def build_retrieval_loss(name: str, **kwargs: object) -> RetrievalLoss:
    """The retrieval loss called ``name`` ("uto", "hinge", "infonce") built with ``kwargs``."""
    if name not in RETRIEVAL_LOSSES:
        raise ConfigError(f"unknown retrieval loss '{name}'; choose one of {sorted(RETRIEVAL_LOSSES)}")
    cls = RETRIEVAL_LOSSES[name]
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"retrieval loss '{name}' does not take {unknown}; it takes {sorted(accepted)}")
    return cls(**kwargs)


def _mean(per_query: Tensor, query_weights: Tensor | None) -> Tensor:
    """mean_q l_q, or mean_q a_q l_q with a scaled to mean 1 over the term's queries (= sum a l / sum a)."""
    return per_query.mean() if query_weights is None else (query_weights * per_query).mean()


def _check_batch(img: Tensor, txt: Tensor, image_ids: Tensor) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise DataError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must both be (B x d)")
    if image_ids.shape != (img.shape[0],):
        raise DataError(f"image_ids has shape {tuple(image_ids.shape)}, expected ({img.shape[0]},)")
    if image_ids.is_floating_point() or image_ids.dtype == torch.bool:
        raise DataError(f"image_ids must be an integer tensor, got {image_ids.dtype}")
