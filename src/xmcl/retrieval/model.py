"""USER's training task: the dual encoder + momentum key encoders + image/text key queues + the retrieval loss.

A training step, as the trainer drives it::

    losses = model(batch)            # online embeddings, momentum keys, loss; then this step's keys are queued
    losses["loss"].backward(); optimizer.step()
    model.momentum_step()            # key encoders follow the online ones

Inference needs the online towers only: ``xmcl.retrieval.dual_encoder.DualEncoder``, which this model extends (its
state dict keys are the encoders' plus the training entries, which ``encoder_weights`` drops).
With ``use_queue=False`` there are no key encoders or queues and the loss sees the batch only (the VSE++
baseline / "USER without queue" setting). A semantically tolerant loss (``loss.tolerance`` / ``loss.balance``)
also gets each item's semantic vector and, with the queues, a third queue of them written beside the keys.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.contrast import (
    GlobalBatch,
    MomentumQueue,
    RetrievalLoss,
    WarmStartLoss,
    build_retrieval_loss,
    make_key_encoder,
    momentum_update,
)
from xmcl.errors import ConfigError, DataError
from xmcl.nn.global_batchnorm import set_world
from xmcl.nn.gpo import MeanPooling
from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig, check_semantic_source
from xmcl.retrieval.dual_encoder import DualEncoder
from xmcl.runtime.distributed import SINGLE_PROCESS, World, gather_no_grad, gather_with_grad
from xmcl.runtime.threads import alongside


def build_loss(cfg: RetrievalLossConfig) -> RetrievalLoss | WarmStartLoss:
    """The ``xmcl.contrast`` retrieval loss ``cfg`` names, with its own constants; UTO with
    ``uto_warmup_epochs > 0`` starts with that many epochs of the VSE++ sum-of-violations hinge."""
    specific = {
        "uto": {"mu": cfg.mu, "gamma": cfg.gamma},
        "hinge": {"margin": cfg.margin, "warmup_epochs": cfg.warmup_epochs},
        "infonce": {"init_temperature": cfg.init_temperature},
    }
    common = {"batch_weight": cfg.batch_weight, "queue_false_negatives": cfg.queue_false_negatives}
    tolerant = {"tolerance": cfg.tolerance, "tolerance_q": cfg.tolerance_q, "balance": cfg.balance,
                "balance_threshold": cfg.balance_threshold} if cfg.tolerant else {}
    loss = build_retrieval_loss(cfg.name, **common, **tolerant, **specific.get(cfg.name, {}))
    if cfg.name != "uto" or cfg.uto_warmup_epochs == 0:
        return loss
    warmup = build_retrieval_loss("hinge", margin=cfg.margin, warmup_epochs=cfg.uto_warmup_epochs, **common)
    return WarmStartLoss(loss, warmup, cfg.uto_warmup_epochs)


class USERModel(DualEncoder):
    """The dual encoder of ``RetrievalModelConfig`` as it trains, with the loss of ``RetrievalLossConfig``.

    ``batch`` keys: ``images (B, 3, H, W)`` or ``regions (B, R, D)`` + ``region_lengths (B,)``;
    ``tokens (B, L)`` + ``token_lengths (B,)``; ``image_ids (B,)``, the image index of each caption (pairs
    with equal ids are positives of each other and never negatives, in the batch and in the queues);
    ``clip_image (B, clip_dim)`` / ``clip_text (B, clip_dim)``, the frozen CLIP's embeddings of each item's image
    and caption, needed when ``cfg.cge`` / ``cfg.text_cge`` is on (SGE and CGE switch independently).
    ``vocab_size`` is needed for the BiGRU text encoder only. ``state_dict()`` holds the online and key
    encoders and both queues (keys, ids, pointer, fill count); with a tolerant loss and the queues, also
    ``semantic_queue``: each queued item's semantic vector (``semantic_vectors``), same slots as the key queues.
    """

    def __init__(self, cfg: RetrievalModelConfig, loss_cfg: RetrievalLossConfig, vocab_size: int | None = None) -> None:
        super().__init__(cfg, vocab_size)
        self.loss = build_loss(loss_cfg)
        self.world = SINGLE_PROCESS
        self.image_key_encoder: nn.Module | None = None
        self.text_key_encoder: nn.Module | None = None
        self.image_queue: MomentumQueue | None = None
        self.text_queue: MomentumQueue | None = None
        self.semantic_queue: MomentumQueue | None = None
        self.compiled = False
        check_semantic_source(cfg, loss_cfg)
        self.semantic_source = loss_cfg.semantic_source if loss_cfg.tolerant else None
        if cfg.use_queue:
            self.image_key_encoder = make_key_encoder(self.image_encoder)
            self.text_key_encoder = make_key_encoder(self.text_encoder)
            self.image_queue = MomentumQueue(cfg.queue_size, cfg.embed_dim)
            self.text_queue = MomentumQueue(cfg.queue_size, cfg.embed_dim)
            if self.semantic_source is not None:
                dim = cfg.clip_dim if self.semantic_source == "clip" else self.image_encoder.local_dim
                self.semantic_queue = MomentumQueue(cfg.queue_size, dim)
            self._set_key_modes()

    def compile_towers(self) -> None:
        """``torch.compile`` each tower's forward in place (online and key; ``nn.Module.compile``, so parameter names,
        checkpoint keys and the momentum update are unchanged); a graph breaks where a set's padding picks a path."""
        for tower in (self.image_encoder, self.text_encoder, self.image_key_encoder, self.text_key_encoder):
            if tower is not None:
                tower.compile()
        self.compiled = True

    def train(self, mode: bool = True) -> "USERModel":
        """As ``nn.Module.train``, except for the key encoders' modes (``cfg.key_modes``)."""
        super().train(mode)
        self._set_key_modes()
        return self

    def _set_key_modes(self) -> None:
        if not self.cfg.use_queue:
            return
        if self.cfg.key_modes == "authors":
            self.image_key_encoder.train(self.training)
            self.text_key_encoder.eval()
        elif self.cfg.key_modes == "eval":
            self.image_key_encoder.eval()
            self.text_key_encoder.eval()

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The loss dict (``"loss"`` plus its parts); in training mode the batch's keys are then queued."""
        image_inputs, region_lengths = _image_inputs(batch)
        image_inputs = self.image_encoder.reduce(image_inputs)  # the frozen PCA, once for the online and key towers
        tokens, token_lengths = self.text_inputs(batch), _require(batch, "token_lengths")
        clip_image, clip_text = batch.get("clip_image"), batch.get("clip_text")

        @torch.no_grad()
        def keys() -> tuple[Tensor, Tensor]:
            return (self.image_key_encoder(image_inputs, region_lengths, clip_image),
                    self.text_key_encoder(tokens, token_lengths, clip_text))

        with alongside(keys, self._keys_alongside(image_inputs)) as key_embeddings:
            img = self.image_encoder(image_inputs, region_lengths, clip_image)
            txt = self.text_encoder(tokens, token_lengths, clip_text)
        image_ids = _require(batch, "image_ids").to(img.device)
        semantic = None if self.semantic_source is None else self.semantic_vectors(batch).to(img.device)
        global_batch = self._global_batch(img, txt, image_ids, semantic)
        if not self.cfg.use_queue:
            return self.loss(img, txt, image_ids, global_batch=global_batch, semantic=semantic)
        img_key, txt_key = key_embeddings()
        # copies: the backward pass needs the queue as it was, and the queue is written before backward runs
        losses = self.loss(img, txt, image_ids, img_key=img_key, txt_key=txt_key,
                           img_queue=self.image_queue.keys.clone(), txt_queue=self.text_queue.keys.clone(),
                           queue_ids=self.image_queue.ids.clone(), queue_valid=self.image_queue.valid_mask(),
                           global_batch=global_batch, semantic=semantic,
                           queue_semantic=None if self.semantic_queue is None else self.semantic_queue.keys)
        if self.training:  # every rank writes every rank's keys, in rank order: one queue, the same everywhere
            queued_ids = gather_no_grad(image_ids, self.world)
            self.image_queue.enqueue(gather_no_grad(img_key, self.world), queued_ids)
            self.text_queue.enqueue(gather_no_grad(txt_key, self.world), queued_ids)
            if self.semantic_queue is not None:
                self.semantic_queue.enqueue(semantic if global_batch is None else global_batch.semantic, queued_ids)
        return losses

    def _keys_alongside(self, image_inputs: Tensor) -> bool:
        """Whether the key towers (if any) run beside the online ones (``runtime.threads.alongside``): on the CPU, where
        an intra-op pool splits the towers' many small and memory-bound operators poorly, and only where the key towers
        draw no random numbers (eval mode), run eagerly (``torch.compile`` is not thread-safe) and without autocast
        (its state is per thread)."""
        return (self.cfg.use_queue and image_inputs.device.type == "cpu" and not self.image_key_encoder.training
                and not self.text_key_encoder.training and not self.compiled
                and not torch.is_autocast_enabled("cpu"))

    @torch.no_grad()
    def fit_region_reduction(self, blocks: Iterable[Tensor]) -> None:
        """Fit the image tower's frozen PCA (``cfg.region_pca_dim``) on ``blocks`` of raw region rows ``(n, region_dim)``
        (the training split's features); the key encoder gets the same projection."""
        reduction = self.image_encoder.reduction
        if reduction is None:
            raise ConfigError("model.region_pca_dim is not set: this model has no PCA projection to fit")
        reduction.fit(blocks)
        if self.image_key_encoder is not None:
            self.image_key_encoder.reduction.load_state_dict(reduction.state_dict())

    @torch.no_grad()
    def semantic_vectors(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, c) unit semantic vectors z_b of the batch's images for the tolerant loss, detached:
        ``loss.semantic_source="clip"``: ``clip_image``; ``"regions"``: the mean of the item's valid region
        features, z_b = normalise(sum_{r < len_b} x_br / len_b) (after the frozen PCA where the model has one: then
        z_b is the centred mean in the PCA space), or, for images through a frozen backbone, the mean of its last
        feature map's cells (one more backbone pass)."""
        if self.semantic_source == "clip":
            z = _require(batch, "clip_image")
        elif "images" in batch:
            z = self.image_encoder.backbone(batch["images"]).flatten(2).mean(dim=2)
        else:
            regions = _require(batch, "regions")
            lengths = _require(batch, "region_lengths").to(regions.device)
            if regions.dim() != 3 or lengths.shape != regions.shape[:1]:
                raise DataError(f"regions {tuple(regions.shape)} and region_lengths {tuple(lengths.shape)} must be "
                                "(B, R, D) and (B,)")
            # the PCA is affine, so the mean of the projected cells is the projected mean: B rows, not B x R
            z = self.image_encoder.reduce(MeanPooling()(regions, lengths))
        return F.normalize(z.float(), dim=1)


    def set_world(self, world: World) -> None:
        """Train data-parallel in ``world``: in-batch negatives come from every rank's batch (gathered with
        gradient), BatchNorm statistics span every rank's batch, and the queues take every rank's keys."""
        self.world = world
        set_world(self, world)

    def _global_batch(self, img: Tensor, txt: Tensor, image_ids: Tensor, semantic: Tensor | None) -> GlobalBatch | None:
        if not self.world.distributed:
            return None
        return GlobalBatch(gather_with_grad(img, self.world), gather_with_grad(txt, self.world),
                           gather_no_grad(image_ids, self.world), self.world.rank * img.shape[0], self.world.size,
                           None if semantic is None else gather_no_grad(semantic, self.world))

    @torch.no_grad()
    def momentum_step(self) -> None:
        """``theta_key <- m theta_key + (1 - m) theta_online`` for both towers (call after the optimiser step)."""
        if self.cfg.use_queue:
            momentum_update(self.image_encoder, self.image_key_encoder, self.cfg.momentum)
            momentum_update(self.text_encoder, self.text_key_encoder, self.cfg.momentum)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the loss (the hinge loss switches to hardest negatives after its warm-up)."""
        self.loss.set_epoch(epoch)


    def parameter_groups(self, lr: float, text_lr_scale: float = 0.1, weight_decay: float = 1e-4,
                         backbone_lr_scale: float = 0.01, decay_all: bool = False) -> list[dict]:
        """AdamW groups over the trainable parameters (key encoders excluded: they have no gradient).

        The pretrained BERT-family text model runs at ``lr * text_lr_scale`` and the CNN backbone at
        ``lr * backbone_lr_scale`` (VSE-infinity's ``backbone_lr_factor``); everything else at ``lr``.
        Tensors of at most one dimension (biases, norm scales, the InfoNCE temperature) get no weight decay,
        unless ``decay_all`` (every parameter decays, as the USER authors' optimiser).
        Only parameters that require gradients now are listed: build the groups after freezing.
        """
        scales = {"main": 1.0, "text_model": text_lr_scale, "backbone": backbone_lr_scale}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("text_encoder.sequence.") and self.cfg.text_encoder == "bert":
                part = "text_model"
            elif name.startswith("image_encoder.backbone."):
                part = "backbone"
            else:
                part = "main"
            groups.setdefault((part, decay_all or param.ndim > 1), []).append(param)
        return [
            {"name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": lr * scales[part],
             "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in groups.items()
        ]


def _require(batch: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in batch:
        raise DataError(f"the batch has no '{key}' (it has {sorted(batch)})")
    return batch[key]


def _image_inputs(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    if "images" in batch:
        return batch["images"], None
    if "regions" in batch:
        return batch["regions"], _require(batch, "region_lengths")
    raise DataError(f"the batch has neither 'images' nor 'regions' (it has {sorted(batch)})")

