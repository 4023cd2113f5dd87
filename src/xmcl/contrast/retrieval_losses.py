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
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError

QUEUE_FALSE_NEGATIVE_MODES = ("mask", "keep")


@dataclass
class GlobalBatch:
    """The embeddings and image ids of every rank's batch, in rank order (this rank's rows at ``offset``), and the
    number of ranks: the in-batch candidates of a data-parallel step."""

    img: Tensor
    txt: Tensor
    image_ids: Tensor
    offset: int
    world_size: int


class RetrievalLoss(nn.Module):
    """Base class: input checks, masks, batch and queue terms; subclasses define ``directional``."""

    sums_over_queries = False  # True where ``directional`` sums (not averages) over its queries

    def __init__(self, batch_weight: float = 1.0, queue_false_negatives: str = "mask") -> None:
        super().__init__()
        if batch_weight < 0:
            raise ConfigError(f"batch_weight must be >= 0, got {batch_weight}")
        if queue_false_negatives not in QUEUE_FALSE_NEGATIVE_MODES:
            raise ConfigError(
                f"queue_false_negatives must be one of {QUEUE_FALSE_NEGATIVE_MODES}, got '{queue_false_negatives}'"
            )
        self.batch_weight = float(batch_weight)
        self.queue_false_negatives = queue_false_negatives

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (also after a resume); no-op unless overridden."""

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """Scalar loss of Q queries: ``scores`` (Q x N), ``positives`` (Q,), ``negatives`` (Q x N) bool."""
        raise NotImplementedError

    def batch_term(self, i2t: Tensor, t2i: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """Image-to-text plus text-to-image directional terms: ``i2t`` (B x G) scores of the image queries against
        the candidate captions, ``t2i`` (B x G) of the text queries against the candidate images, ``positives`` (B,)
        the pairs' scores, ``negatives`` (B x G) the mask of candidates with another image id."""
        return self.directional(i2t, positives, negatives) + self.directional(t2i, positives, negatives)

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
    ) -> dict[str, Tensor]:
        _check_batch(img, txt, image_ids)
        if global_batch is None:
            sim = img @ txt.T
            batch = self.batch_term(sim, sim.T, sim.diagonal(), image_ids[:, None] != image_ids[None, :])
        else:
            i2t = img @ global_batch.txt.T
            local = torch.arange(img.shape[0], device=img.device)
            negatives = image_ids[:, None] != global_batch.image_ids[None, :]
            batch = self.batch_term(i2t, txt @ global_batch.img.T, i2t[local, global_batch.offset + local], negatives)
        out = {"batch": batch}
        loss = self.batch_weight * batch
        if img_queue is not None or txt_queue is not None:
            negatives = self._queue_negatives(img, img_key, txt_key, img_queue, txt_queue, image_ids,
                                              queue_ids, queue_valid)
            img_key, txt_key = img_key.detach(), txt_key.detach()
            out["queue_i2t"] = self.directional(img @ txt_queue.detach().T, (img * txt_key).sum(1), negatives)
            out["queue_t2i"] = self.directional(txt @ img_queue.detach().T, (txt * img_key).sum(1), negatives)
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
    ) -> Tensor:
        """Check the queue inputs and return the (B x K) mask of queue entries that are negatives."""
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
        return negatives


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
    """

    def __init__(self, mu: float = 90.0, gamma: float = 0.5, batch_weight: float = 1.0,
                 queue_false_negatives: str = "mask") -> None:
        super().__init__(batch_weight, queue_false_negatives)
        if mu <= 0:
            raise ConfigError(f"UTO mu must be > 0, got {mu}")
        self.mu = float(mu)
        self.gamma = float(gamma)

    def _negative_part(self, scores: Tensor, negatives: Tensor) -> Tensor:
        """(Q,) (1/mu) log(1 + sum_{k negative} exp(mu (s_qk - gamma)))."""
        x = (self.mu * (scores - self.gamma)).masked_fill(~negatives, -math.inf)
        x = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
        return torch.logsumexp(x, dim=1) / self.mu

    @staticmethod
    def _positive_part(positives: Tensor) -> Tensor:
        """(Q,) log(1 + relu(p_q))."""
        return torch.log1p(F.relu(positives))

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        return (self._negative_part(scores, negatives) - self._positive_part(positives)).mean()

    def batch_term(self, i2t: Tensor, t2i: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        return (self._negative_part(i2t, negatives).mean() + self._negative_part(t2i, negatives).mean()
                - self._positive_part(positives).mean())


class HingeLoss(RetrievalLoss):
    """VSE++ hinge (Faghri et al. 2018), as in VSE-infinity's ``ContrastiveLoss``.

    Per direction: sum_q sum_{k negative} [margin + s_qk - p_q]_+ during the first ``warmup_epochs`` epochs
    (VSE-infinity's ``vse_mean_warmup_epochs``), then sum_q max_{k negative} [margin + s_qk - p_q]_+ (hardest
    negative). Reduction is a sum over queries, as in VSE-infinity (learning rates there are tuned for it).
    Differences: same-id items are never negatives (VSE-infinity masks only the diagonal); the queue terms use
    the same rule with the momentum key as the positive. The trainer calls ``set_epoch`` every epoch.
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

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
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
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True,
                 batch_weight: float = 1.0, queue_false_negatives: str = "mask") -> None:
        super().__init__(batch_weight, queue_false_negatives)
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

    def directional(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        scale = self.scale()
        pos = scale * positives
        neg = (scale * scores).masked_fill(~negatives, -math.inf)
        return (torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos).mean()


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


def _check_batch(img: Tensor, txt: Tensor, image_ids: Tensor) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise DataError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must both be (B x d)")
    if image_ids.shape != (img.shape[0],):
        raise DataError(f"image_ids has shape {tuple(image_ids.shape)}, expected ({img.shape[0]},)")
    if image_ids.is_floating_point() or image_ids.dtype == torch.bool:
        raise DataError(f"image_ids must be an integer tensor, got {image_ids.dtype}")
