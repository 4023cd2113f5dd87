"""Training and evaluating a retrieval model (USER or a baseline) from a config.

Per step: loss -> finite check -> backward -> clip (``optim.grad_clip``) -> AdamW step -> momentum update of the key
encoders (the queues were filled inside the forward, after the loss). Per epoch: validation rSum, ``last.pt``
(and ``best.pt`` when rSum improves) written atomically, a JSONL log and a PNG of the curves. A checkpoint holds
everything an exact resume needs: model (key encoders and queues included), optimiser, scheduler, RNG states,
epoch and step within the epoch (batches are a seeded permutation per epoch, so a resume skips the done ones).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from xmcl.config import config_from_dict, config_to_dict, save_config
from xmcl.data.batches import CaptionPairs, Collate, SplitCaptions, SplitImages
from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import ImageTransform
from xmcl.data.open import open_split
from xmcl.device import resolve_device
from xmcl.data.text import HFTokenizer, TextTokenizer, Vocabulary, VocabTokenizer, resolve_text_model_dir
from xmcl.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingStalled
from xmcl.evaluation import Metrics, evaluate_embeddings
from xmcl.retrieval.clip_cache import SplitGuides, split_guides
from xmcl.retrieval.config import LossConfig, ModelConfig
from xmcl.retrieval.model import USERModel
from xmcl.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint, \
    seed_everything
from xmcl.training.logging import JsonlLogger, plot_curves

CHECKPOINT_FORMAT = "xmcl.retrieval/1"


@dataclass
class DataConfig:
    """Where the corpus is and how items are prepared.

    ``path``: a corpus folder or Karpathy JSON (raw images) or a folder of precomputed features.
    ``val_max_images``: evaluate on the first N validation images only (faster epochs; None = all).
    """

    path: str = "runs/shapes"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    augment_images: bool = True
    augment_captions: bool = True
    max_caption_tokens: int = 64
    vocab_min_count: int = 1
    num_workers: int = 0
    val_max_images: int | None = None


@dataclass
class OptimConfig:
    """AdamW with step decay: lr x ``lr_decay_factor`` at each epoch of ``lr_decay_epochs``.

    ``max_steps_per_epoch`` caps an epoch (budgeted comparisons); ``checkpoint_every`` also writes ``last.pt``
    every N steps inside an epoch (0 = at epoch ends only).
    """

    epochs: int = 25
    batch_size: int = 128
    lr: float = 5e-4
    text_lr_scale: float = 0.1
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    lr_decay_epochs: list[int] = field(default_factory=lambda: [15])
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0
    max_steps_per_epoch: int | None = None
    checkpoint_every: int = 0


@dataclass
class RetrievalTrainConfig:
    """Everything one training run needs (``configs/*.yaml`` hold instances).

    ``threads``: CPU threads for torch (0 = torch's default). Use 1 when other jobs share the cores: small
    models step several times slower on two contended threads (the GRUs issue many tiny kernels).
    """

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def build_tokenizer(model_cfg: ModelConfig, max_tokens: int, vocab: Vocabulary | None) -> TextTokenizer:
    """The tokenizer of the configured text encoder (a vocabulary for the BiGRU, the model's own for BERT)."""
    if model_cfg.text_encoder == "bert":
        return HFTokenizer(resolve_text_model_dir(model_cfg.text_model))
    if vocab is None:
        raise ConfigError("model.text_encoder='bigru' needs a vocabulary")
    return VocabTokenizer(vocab, max_length=max_tokens)


def image_transform(model_cfg: ModelConfig, model: USERModel, size: int, train: bool) -> ImageTransform | None:
    """The pixel preprocessing of the model's backbone (None when the model reads region features)."""
    if model_cfg.image_input != "images":
        return None
    return ImageTransform(size, model.image_encoder.backbone.normalization, train=train)


def _check_input(split: CaptionSplit, model_cfg: ModelConfig) -> None:
    if model_cfg.image_input == "regions":
        if split.region_features is None:
            raise ConfigError(f"{split.source}: model.image_input='regions' but this corpus holds raw images; "
                              f"extract features with `xmcl features` or set model.image_input=images")
        if split.region_features.shape[-1] != model_cfg.region_dim:
            raise ConfigError(f"{split.source}: region features are {split.region_features.shape[-1]}-d but "
                              f"model.region_dim is {model_cfg.region_dim}")
    elif split.image_paths is None:
        raise ConfigError(f"{split.source}: model.image_input='images' but this corpus holds precomputed "
                          f"features; set model.image_input=regions")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def encode_split(model: USERModel, split: CaptionSplit, tokenizer: TextTokenizer,
                 transform: ImageTransform | None, device: torch.device, batch_size: int = 256,
                 num_workers: int = 0, guides: SplitGuides | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings of every image (N, d) and caption (M, d) of the split, by the online encoders
    (``guides``: the split's CLIP embeddings, needed when the model has CGE; see ``split_guides``)."""
    model.eval()
    collate = Collate(tokenizer.pad_id)
    clip_image, clip_text = (guides.image, guides.text) if guides is not None else (None, None)
    images, texts = [], []
    for batch in DataLoader(SplitImages(split, transform, clip_image), batch_size=batch_size, collate_fn=collate,
                            num_workers=num_workers):
        batch = _to_device(batch, device)
        inputs = batch["images"] if "images" in batch else batch["regions"]
        images.append(model.encode_images(inputs, batch.get("region_lengths"), batch.get("clip_image")).float().cpu())
    for batch in DataLoader(SplitCaptions(split, tokenizer, clip_text), batch_size=batch_size, collate_fn=collate,
                            num_workers=num_workers):
        batch = _to_device(batch, device)
        texts.append(model.encode_texts(batch["tokens"], batch["token_lengths"], batch.get("clip_text")).float().cpu())
    return torch.cat(images), torch.cat(texts)


def _epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, max_steps: int | None) -> list[list[int]]:
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    batches = [order[i: i + batch_size].tolist() for i in range(0, num_items, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one has no in-batch negatives
        batches.pop()
    return batches[:max_steps] if max_steps else batches


class _Run:
    """The state of one training run and the file layout of its folder."""

    def __init__(self, cfg: RetrievalTrainConfig, out_dir: Path) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.last, self.best = self.out / "last.pt", self.out / "best.pt"
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_rsum, self.best_epoch = -math.inf, -1
        self.clip_sha256: str | None = None  # the CLIP checkpoint behind the CGE guides

    def state(self, model, optimizer, scheduler, vocab: Vocabulary | None) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "vocab": None if vocab is None else vocab.words,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_rsum": self.best_rsum,
            "best_epoch": self.best_epoch,
            "clip_sha256": self.clip_sha256,
        }

    def restore(self, state: dict, model, optimizer, scheduler) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_rsum, self.best_epoch = state["global_step"], state["best_rsum"], state["best_epoch"]


def _check_resumable(state: dict, cfg: RetrievalTrainConfig, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a retrieval checkpoint (format {state.get('format')!r})")
    saved, now = state["config"], config_to_dict(cfg)
    fixed = ("model", "loss", "data")
    changed = [f"{section}.{k}" for section in fixed for k in now[section]
               if saved.get(section, {}).get(k) != now[section][k]]
    if changed:
        raise CheckpointError(f"{path} was trained with another config ({', '.join(changed)} differ); "
                              f"use another --out folder or --no-resume")


def train_retrieval(cfg: RetrievalTrainConfig, out_dir: Path, resume: bool = True, progress: bool = True) -> dict:
    """Train per ``cfg`` into ``out_dir``; returns ``{"best_rsum", "best_epoch", "last", "best", "history"}``."""
    run = _Run(cfg, out_dir)
    run.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    train_split = open_split(cfg.data.path, cfg.data.train_split)
    val_split = open_split(cfg.data.path, cfg.data.val_split)
    if cfg.data.val_max_images:
        val_split = val_split.subset(np.arange(min(cfg.data.val_max_images, val_split.num_images)))
    _check_input(train_split, cfg.model)
    train_guides = split_guides(cfg.model, train_split, device)
    val_guides = split_guides(cfg.model, val_split, device)
    run.clip_sha256 = train_guides.sha256

    state = None
    if resume and run.last.exists():
        state = load_checkpoint(run.last)
        _check_resumable(state, cfg, run.last)
        if state.get("clip_sha256") != run.clip_sha256:
            raise CheckpointError(f"{run.last} was trained with CGE guides of another CLIP checkpoint than the "
                                  f"cache's now; use another --out folder or --no-resume")
    vocab = None
    if cfg.model.text_encoder == "bigru":
        vocab = Vocabulary(state["vocab"]) if state else Vocabulary.build(train_split.captions,
                                                                          cfg.data.vocab_min_count)
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, vocab)
    model = USERModel(cfg.model, cfg.loss, vocab_size=tokenizer.vocab_size).to(device)
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.optim.lr, cfg.optim.text_lr_scale,
                                                         cfg.optim.weight_decay, cfg.optim.backbone_lr_scale))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.optim.lr_decay_epochs, cfg.optim.lr_decay_factor)
    if state is not None:
        run.restore(state, model, optimizer, scheduler)
    save_config(cfg, run.out / "config.yaml")
    logger = JsonlLogger(run.out / "log.jsonl")

    dataset = CaptionPairs(train_split, tokenizer, image_transform(cfg.model, model, cfg.data.image_size,
                                                                   cfg.data.augment_images),
                           augment_captions=cfg.data.augment_captions, seed=cfg.seed,
                           clip_image=train_guides.image, clip_text=train_guides.text)
    eval_transform = image_transform(cfg.model, model, cfg.data.image_size, train=False)
    collate = Collate(tokenizer.pad_id)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, run.state(model, optimizer, scheduler, vocab))

    while run.epoch < cfg.optim.epochs:
        epoch = run.epoch
        dataset.set_epoch(epoch)
        model.set_epoch(epoch)
        model.train()
        batches = _epoch_batches(len(dataset), cfg.optim.batch_size, cfg.seed, epoch, cfg.optim.max_steps_per_epoch)
        loader = DataLoader(dataset, batch_sampler=batches[run.step_in_epoch:], collate_fn=collate,
                            num_workers=cfg.data.num_workers, persistent_workers=False)
        bar = tqdm(loader, total=len(batches), initial=run.step_in_epoch, disable=not progress,
                   desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="batch", dynamic_ncols=True)
        tic, seen, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
        for batch in bar:
            batch = _to_device(batch, device)
            losses = model(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {run.step_in_epoch + 1}; training "
                    f"stopped, the last good checkpoint is {run.last if run.last.exists() else 'not written yet'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.grad_clip)
            if run.global_step == 0 and float(grad_norm) == 0.0:
                raise TrainingStalled(
                    f"the {cfg.loss.name} loss ({loss.item():.4g}) gives no gradient at the first step: with UTO "
                    f"this happens when every matching image-caption similarity starts <= 0; set "
                    f"loss.uto_warmup_epochs=1 (a VSE++ hinge warm-up) or another seed")
            optimizer.step()
            model.momentum_step()
            run.step_in_epoch += 1
            run.global_step += 1
            seen += batch["tokens"].shape[0]
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            rate = seen / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
            logger.log({"step": run.global_step, "epoch": epoch + 1, "loss": loss.item(),
                        "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
                        **{f"loss_{k}": v.item() for k, v in losses.items() if k != "loss"}})
            if cfg.optim.checkpoint_every and run.global_step % cfg.optim.checkpoint_every == 0:
                checkpoint(run.last)
        bar.close()

        img, txt = encode_split(model, val_split, tokenizer, eval_transform, device,
                                num_workers=cfg.data.num_workers, guides=val_guides)
        metrics = evaluate_embeddings(img, txt, val_split.caption_image, protocols=("all",))["all"]
        scheduler.step()
        run.epoch, run.step_in_epoch = epoch + 1, 0
        improved = metrics.rsum > run.best_rsum
        if improved:
            run.best_rsum, run.best_epoch = metrics.rsum, epoch + 1
        checkpoint(run.last)
        if improved:
            checkpoint(run.best)
        record = {"step": run.global_step, "epoch": epoch + 1,
                  "train_loss_mean": loss_sum / max(loss_count, 1), "samples_per_s": seen / max(
                      time.perf_counter() - tic, 1e-9), **{f"val_{k}": v for k, v in metrics.as_dict().items()}}
        logger.log(record)
        plot_curves(run.out / "log.jsonl", run.out / "curves.png")
        if progress:
            tqdm.write(f"epoch {epoch + 1}: val rSum {metrics.rsum:.2f} (R@1 i2t {metrics.i2t_r1:.1f}, "
                       f"t2i {metrics.t2i_r1:.1f}){'  best' if improved else ''}")
    return {"best_rsum": run.best_rsum, "best_epoch": run.best_epoch, "last": run.last, "best": run.best}


def load_trained(checkpoint: Path, device: torch.device) -> tuple[USERModel, TextTokenizer, RetrievalTrainConfig]:
    """The model (eval mode), tokenizer and config saved in a training checkpoint."""
    model, tokenizer, cfg, _ = _load_trained_state(checkpoint, device)
    return model, tokenizer, cfg


def _load_trained_state(checkpoint: Path, device: torch.device
                        ) -> tuple[USERModel, TextTokenizer, RetrievalTrainConfig, dict]:
    state = load_checkpoint(checkpoint)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{checkpoint}: not a retrieval checkpoint (format {state.get('format')!r})")
    cfg = config_from_dict(RetrievalTrainConfig, state["config"], where=str(checkpoint))
    vocab = Vocabulary(state["vocab"]) if state.get("vocab") else None
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, vocab)
    model = USERModel(cfg.model, cfg.loss, vocab_size=tokenizer.vocab_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, cfg, state


def embed_checkpoint(checkpoint: Path, data_path: Path | None, split: str, device: str | torch.device = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor, CaptionSplit, RetrievalTrainConfig]:
    """Image (N, d) and caption (M, d) unit embeddings of ``split`` of ``data_path`` (default: the model's
    training corpus) by a trained model, with the split and the model's config.

    With CGE, the CLIP embeddings come from the model's cache; images or captions it lacks are encoded by the
    CLIP teacher (``model.clip_path``), which must be the checkpoint the model was trained with."""
    torch_device = resolve_device(device)
    model, tokenizer, cfg, state = _load_trained_state(checkpoint, torch_device)
    corpus = open_split(data_path if data_path is not None else cfg.data.path, split)
    _check_input(corpus, cfg.model)
    guides = split_guides(cfg.model, corpus, torch_device, compute_missing=True,
                          trained_sha256=state.get("clip_sha256"))
    transform = image_transform(cfg.model, model, cfg.data.image_size, train=False)
    img, txt = encode_split(model, corpus, tokenizer, transform, torch_device, guides=guides)
    return img, txt, corpus, cfg


def evaluate_checkpoint(checkpoint: Path, data_path: Path | None, split: str, protocols: Iterable[str],
                        device: str = "auto") -> dict[str, Metrics]:
    """Metrics per protocol of a trained model on ``split`` of ``data_path`` (see ``embed_checkpoint``)."""
    img, txt, corpus, _ = embed_checkpoint(checkpoint, data_path, split, device)
    return evaluate_embeddings(img, txt, corpus.caption_image, protocols=tuple(protocols))
