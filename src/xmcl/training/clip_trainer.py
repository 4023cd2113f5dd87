"""The ``xmcl train-clip`` loop, written out: a small CLIP trained from scratch on a corpus (the shapes world), so
that CGE runs end to end without outside weights.

The model is a ``transformers.CLIPModel`` (``xmcl.retrieval.clip.small``) trained with symmetric InfoNCE
(``xmcl.contrast``, learnable temperature; captions of the same image are not negatives of each other). Its
tokenizer is CLIP's byte-level BPE layout with merges learned from the training captions. Images go through CLIP's
preprocessing without augmentation (flips would swap "left of" and "right of"). Each epoch ends with validation
rSum; the best model is saved into the run folder in the transformers CLIP format, which ``load_clip_teacher``
reads. ``last.pt`` (model, temperature, optimiser, scheduler, RNG, the model's random stream, tokenizer, epoch
and step) resumes exactly from any step, even after ``kill -9``; log records after it are dropped on resume.

Data-parallel (``torchrun --nproc_per_node N -m xmcl train-clip ...``): ``optim.batch_size`` is one rank's batch; every
rank draws the same epoch order from ``(run.seed, epoch)``, cuts it into global batches of ``N * batch_size`` and takes
its slice, so N ranks see exactly the samples of one process with the N-fold batch. InfoNCE runs over the global batch
(embeddings gathered with gradient; each rank's queries against every rank's candidates) and DistributedDataParallel
averages the gradients (``Objective``): the step of that one process. Rank 0 holds the folder lock, writes ``last.pt``,
the best model, the log and the curves, and validates; its rSum is broadcast. A refusal at the start ends every rank at
once with its message; a stop signal on any rank stops them all; ``last.pt`` records the world size and a resume with
another is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmcl.contrast import build_retrieval_loss
from xmcl.contrast.retrieval_losses import GlobalBatch
from xmcl.data.corpus import CaptionSplit
from xmcl.data.open import open_split
from xmcl.errors import DataError
from xmcl.metrics.retrieval import Metrics, evaluate_embeddings
from xmcl.retrieval.clip.config import ClipTrainConfig
from xmcl.retrieval.clip.preprocess import ClipImagePreprocess
from xmcl.retrieval.clip.small import new_clip_model, save_clip
from xmcl.retrieval.clip.teacher import clip_image_features, clip_text_features
from xmcl.retrieval.clip.tokenizer import ClipTokenizer, train_bpe
from xmcl.runtime.device import peak_memory_mib
from xmcl.runtime.distributed import (
    World,
    broadcast_from_main,
    data_parallel,
    gather_no_grad,
    gather_with_grad,
)
from xmcl.runtime.precision import Precision
from xmcl.runtime.rng import TorchStream, derived_seed
from xmcl.runtime.run_config import start_run
from xmcl.training.progress import PendingLosses, TrainingProgress
from xmcl.training.run import (
    Checkpointer,
    RunFolder,
    StepLogger,
    StopSignals,
    capture_states,
    check_finite,
    epochs_all_done,
    restore_states,
    run_loop,
)
from xmcl.training.schedule import warmup_cosine

CLIP_RUN_CHECKPOINT = ("xmcl.clip.train", 2)  # kind and version of train-clip's last.pt (2: safe to load)
CLIP_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")  # the best model, as save_clip writes
MODEL_STREAM = 1  # purpose of the model's random stream drawn from run.seed


class Objective(nn.Module):
    """The InfoNCE loss of a batch as one module over the CLIP model and the loss's learnable temperature, the
    forward that data-parallel training wraps (``data_parallel``); in ``world``, over the global batch."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, world: World) -> None:
        super().__init__()
        self.model, self.loss_fn, self.world = model, loss_fn, world

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                image_ids: torch.Tensor) -> torch.Tensor:
        img = clip_image_features(self.model, pixels)
        txt = clip_text_features(self.model, ids, mask)
        everyone = None if not self.world.distributed else GlobalBatch(
            gather_with_grad(img, self.world), gather_with_grad(txt, self.world),
            gather_no_grad(image_ids, self.world), offset=self.world.rank * len(image_ids),
            world_size=self.world.size)
        return self.loss_fn(img, txt, image_ids, global_batch=everyone)["loss"]


def _pixels(split: CaptionSplit, size: int) -> torch.Tensor:
    if split.image_paths is None:
        raise DataError(f"{split.source} (split '{split.name}') holds region features; train-clip needs raw images")
    preprocess = ClipImagePreprocess(size)
    return torch.stack([preprocess(path) for path in split.image_paths])


def one_caption_per_image(caption_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One caption index per image, drawn uniformly among its captions, the images in random order."""
    shuffled = rng.permutation(len(caption_image))
    _, first = np.unique(caption_image[shuffled], return_index=True)
    return rng.permutation(shuffled[first])


@torch.no_grad()
def _evaluate(model, pixels: torch.Tensor, tokenizer: ClipTokenizer, split: CaptionSplit,
              device: torch.device, batch_size: int = 256) -> Metrics:
    model.eval()
    img = torch.cat([clip_image_features(model, pixels[i: i + batch_size].to(device)).cpu()
                     for i in range(0, len(pixels), batch_size)])
    txt = torch.cat([clip_text_features(model, *(t.to(device) for t in tokenizer.batch(
        split.captions[i: i + batch_size]))).cpu() for i in range(0, split.num_captions, batch_size)])
    return evaluate_embeddings(img, txt, split.caption_image, protocols=("all",))["all"]


def train_clip(cfg: ClipTrainConfig, out_dir: Path | str, *, resume: bool = True, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Train a small CLIP on ``cfg.data`` and save the best (validation rSum) into ``out_dir`` (held locked for the
    run). ``resume`` / ``overwrite`` / ``progress`` as for ``train_retrieval``; SIGINT / SIGTERM save a
    checkpoint and raise ``RunInterrupted``.

    Returns ``{"best_rsum", "best_epoch", "metrics" (the best epoch's Metrics), "out"}``.
    """
    folder = RunFolder(out_dir, outputs=CLIP_FILES)
    return run_loop(folder, cfg.run.device, progress,
                    lambda verbose, stop, world: _train(cfg, folder, resume, overwrite, verbose, stop, world))


def _train(cfg: ClipTrainConfig, folder: RunFolder, resume: bool, overwrite: bool, verbose: bool,
           stop: StopSignals, world: World) -> dict:
    checkpointer = Checkpointer(folder, *CLIP_RUN_CHECKPOINT)
    device, threads = start_run(cfg.run)
    precision = Precision(cfg.run.amp, device)
    train = open_split(cfg.data.path, cfg.data.train_split, key="data.path")
    val = open_split(cfg.data.path, cfg.data.val_split, key="data.path")
    state = checkpointer.start_together(cfg, resume, overwrite, world)  # a refusal ends every rank at once
    if state is not None:
        vocab, merges = state["vocab"], [tuple(pair) for pair in state["merges"]]
    else:
        vocab, merges = train_bpe(train.captions, cfg.model.bpe_vocab_size)
    tokenizer = ClipTokenizer(vocab, merges, cfg.model.context_length, source=f"BPE of {train.source}")
    model = new_clip_model(cfg.model, len(vocab)).to(device)
    if cfg.run.compile:
        model.compile()  # in place: the same parameter names and checkpoint keys
    model.logit_scale.requires_grad_(False)  # the loss's temperature trains; the best epoch copies it in
    loss_fn = build_retrieval_loss("infonce", init_temperature=cfg.model.temperature).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    matrices, vectors = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.optim.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=cfg.optim.lr, fused=True)
    per_rank, global_batch = cfg.optim.batch_size, cfg.optim.batch_size * world.size
    if world.distributed and global_batch > train.num_images:
        raise DataError(f"optim.batch_size={per_rank} per rank x {world.size} ranks = {global_batch} images a "
                        f"step, more than the {train.num_images} training images of {train.source}: lower "
                        f"optim.batch_size or the number of ranks")
    steps_per_epoch = max(1, train.num_images // global_batch)
    total = steps_per_epoch * cfg.optim.epochs
    warmup = max(1, int(cfg.optim.warmup_fraction * total))
    scheduler = warmup_cosine(optimizer, warmup, total)
    model_stream = TorchStream(derived_seed(cfg.run.seed, MODEL_STREAM), device)
    progress = TrainingProgress()
    if state is not None:
        restore_states(state, folder.last, model=model, loss=loss_fn, optimizer=optimizer, scheduler=scheduler,
                       model_stream=model_stream)
        precision.load_state_dict(state.get("grad_scaler"))
        progress.load_state_dict(state, folder.last)
        if epochs_all_done(checkpointer, progress, cfg.optim.epochs, verbose):
            return _summary(folder, progress)
        if world.is_main and progress.step_in_epoch == 0 and progress.best_epoch == progress.epoch > 0:
            save_clip(model, vocab, merges, folder.root)  # a stop between last.pt and the best model's files
    train_pixels = _pixels(train, cfg.model.image_size)
    val_pixels = _pixels(val, cfg.model.image_size) if world.is_main else None
    if world.is_main:
        folder.write_config(cfg)
    logger = StepLogger(folder, verbose and cfg.run.progress, state["log_bytes"] if state else 0,
                        writes=world.is_main, report_to=cfg.run.report_to, resumed_step=progress.global_step)
    caption_image = torch.as_tensor(train.caption_image)

    def checkpoint() -> None:
        progress.lap()
        if not world.is_main:
            return
        checkpointer.save(folder.last, cfg, {
            "vocab": vocab, "merges": [list(pair) for pair in merges],
            **capture_states(model=model, loss=loss_fn, optimizer=optimizer, scheduler=scheduler,
                             model_stream=model_stream),
            **progress.state_dict(), "log_bytes": logger.size(), "world_size": world.size,
            "grad_scaler": precision.state_dict()})

    train_step = data_parallel(Objective(model, loss_fn, world), world, device)  # its backward averages gradients
    pending = PendingLosses(world, device)
    progress.start_clock()
    while progress.epoch < cfg.optim.epochs:
        epoch = progress.epoch
        model.train()
        order = one_caption_per_image(train.caption_image, np.random.default_rng([cfg.run.seed, epoch]))
        tic, seen = time.perf_counter(), 0
        bar = logger.bar(range(progress.step_in_epoch, steps_per_epoch), steps_per_epoch, progress.step_in_epoch,
                         f"train-clip {epoch + 1}/{cfg.optim.epochs}", "batch")
        for step in bar:
            threads.update()  # fewer threads while other processes hold cores
            start = step * global_batch + world.rank * per_rank  # this rank's slice of the global batch
            rows = order[start: start + per_rank]
            images = caption_image[rows]
            image_ids = images.to(device)
            ids, mask = tokenizer.batch([train.captions[m] for m in rows])
            with model_stream.active(), precision.autocast():
                loss = train_step(train_pixels[images].to(device), ids.to(device), mask.to(device), image_ids)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            precision.unscale(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            precision.step(optimizer)
            scheduler.step()
            progress.add_step()
            seen += global_batch
            pending.add(loss)
            logging = progress.global_step % cfg.run.log_every == 0
            saving = bool(cfg.run.checkpoint_every) and progress.global_step % cfg.run.checkpoint_every == 0
            if not (logging or saving or progress.step_in_epoch == steps_per_epoch):
                continue  # between sync points a step reads nothing back from the device
            loss_value, loss_total, steps_read = pending.read()  # the one-process losses; checked alike
            check_finite(loss_total, f"epoch {epoch + 1}, step {progress.step_in_epoch}", folder)
            progress.add_losses(loss_total, steps_read)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if logging:
                logger.log({"step": progress.global_step, "epoch": epoch + 1, "loss": loss_value,
                            "lr": scheduler.get_last_lr()[0]})
            if saving:
                checkpoint()
            if stop.agreed(world, device):
                bar.close()
                checkpoint()
                raise stop.interrupted(f"epoch {epoch + 1}, step {progress.step_in_epoch}", folder)
        bar.close()
        metrics = _evaluate(model, val_pixels, tokenizer, val, device) if world.is_main else None
        rsum = broadcast_from_main(metrics.rsum if metrics else 0.0, world, device)  # every rank agrees on the best
        loss_mean, improved = progress.end_epoch(rsum, metrics.as_dict() if metrics else None)
        if improved:
            with torch.no_grad():
                model.logit_scale.copy_(loss_fn.log_scale.detach().clamp(max=loss_fn.max_log_scale))
        if metrics is not None:
            logger.log({"step": progress.global_step, "epoch": progress.epoch, "train_loss_mean": loss_mean,
                        "seconds": time.perf_counter() - tic, "samples_per_s": seen / (time.perf_counter() - tic),
                        "peak_memory_mib": peak_memory_mib(device),
                        **{f"val_{k}": v for k, v in metrics.as_dict().items()}})
        checkpoint()  # then the best model: a stop between the two is healed on resume (see above)
        if improved and world.is_main:
            save_clip(model, vocab, merges, folder.root)
        stopping = stop.agreed(world, device)
        logger.plot(final=stopping or progress.epoch == cfg.optim.epochs)
        logger.note(f"epoch {progress.epoch}: val rSum {rsum:.1f}")
        if stopping:
            raise stop.interrupted(f"the end of epoch {progress.epoch}", folder)
    return _summary(folder, progress)


def _summary(folder: RunFolder, progress: TrainingProgress) -> dict:
    metrics = None if progress.best_metrics is None else Metrics(**progress.best_metrics)
    return {"best_rsum": progress.best_rsum, "best_epoch": progress.best_epoch, "metrics": metrics,
            "out": folder.root}
