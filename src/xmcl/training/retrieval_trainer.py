"""The retrieval training loop (USER or a baseline), written out.

Per step: loss -> backward -> clip (``optim.grad_clip``) -> AdamW step -> momentum update of the key encoders (the
queues were filled inside the forward, after the loss). The loss stays on the device until a sync point (a log step, a
checkpoint, the epoch's last step; ``PendingLosses``), where the losses since the last one are read, checked finite (a
NaN or inf stops the run before anything is saved) and the stop signals agreed on, so that a step on a GPU waits for
nothing on the host. Per epoch: validation rSum, ``last.pt`` (and ``best.pt`` when rSum improves) written atomically, a
JSONL log and a PNG of the curves. A checkpoint holds everything an exact resume needs: model (key encoders and queues
included), optimiser, scheduler, RNG states, epoch and step within the epoch (batches are a seeded permutation per
epoch, so a resume skips the done ones).

Every random stream is explicit and restored on resume, so a run stopped at any step (even by ``kill -9``) and
resumed ends bit for bit where the uninterrupted run does on the same device: the batch order is drawn from
``(run.seed, epoch)``, caption and image augmentation from ``(run.seed, epoch, caption)``, the DataLoader's worker
seeds from ``(run.seed, LOADER_STREAM, epoch)``, and dropout / grid drop run on the model's own ``TorchStream``,
saved in each checkpoint. The log records written after the resumed checkpoint are dropped (``log_bytes``).

Data-parallel (``torchrun --nproc_per_node N -m xmcl train ...``): ``optim.batch_size`` is the batch of one rank; every
rank cuts the same global batches of ``N * batch_size`` and takes its slice (``training.sharding``), so N ranks train on
exactly the samples of one process with the N-fold batch. The model trains under DistributedDataParallel
(``runtime.distributed.data_parallel``): its backward averages the online towers' gradients over the ranks, bucket by
bucket while the rest of the backward runs, before the clip; the key encoders (no gradient) stay outside it and follow
the (identical) online weights by EMA, as MoCo's; the queues take every rank's keys. Rank 0 alone holds the folder lock,
writes checkpoints, the log and the curves, and runs validation on the whole val split; its rSum is broadcast so every
rank agrees on the best epoch. The logged loss is the mean over the ranks; a stop signal on any rank stops every rank at
the same sync point. A checkpoint records the world size; a resume with another is refused. A refusal at the start (the
folder locked, ``--no-resume`` into a used folder, a changed config) ends every rank at once with rank 0's message
(``Checkpointer.start_together``).
"""

from __future__ import annotations

import dataclasses
import filecmp
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from xmcl.data.batches import CaptionPairs, Collate, float_rows
from xmcl.data.corpus import CaptionSplit
from xmcl.data.open import open_split
from xmcl.data.text import Vocabulary
from xmcl.errors import CheckpointError, TrainingStalled
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.clip.cache import split_guides
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.inference import (
    RETRIEVAL_CHECKPOINT,
    build_tokenizer,
    check_input,
    encode_split,
    image_transform,
    inputs_record,
    to_device,
)
from xmcl.retrieval.model import USERModel
from xmcl.retrieval.token_features import attach_token_features
from xmcl.runtime.device import peak_memory_mib
from xmcl.runtime.distributed import (
    World,
    broadcast_from_main,
    data_parallel,
)
from xmcl.runtime.files import atomic_write_bytes
from xmcl.runtime.log import read_jsonl
from xmcl.runtime.precision import Precision, cuda_layout
from xmcl.runtime.rng import TorchStream, derived_seed, seeded_generator
from xmcl.runtime.run_config import start_run
from xmcl.runtime.threads import fetched_ahead
from xmcl.training.progress import PendingLosses, TrainingProgress
from xmcl.training.run import (
    Checkpointer,
    RunFolder,
    StepLogger,
    StopSignals,
    announce,
    capture_states,
    check_finite,
    epochs_all_done,
    restore_states,
    run_loop,
)
from xmcl.training.sharding import rank_batches

RESUMABLE = ("optim.epochs", "data.num_workers")  # may change when a run resumes
MODEL_STREAM, LOADER_STREAM = 1, 2  # purposes of the random streams drawn from run.seed


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, max_steps: int | None) -> list[list[int]]:
    """The batches of an epoch: a permutation drawn from ``(seed, epoch)`` cut into ``batch_size`` slices; a last
    batch of one is dropped (it has no in-batch negative), and at most ``max_steps`` batches are kept."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    batches = [order[i: i + batch_size].tolist() for i in range(0, num_items, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches[:max_steps] if max_steps else batches


def region_rows(split: CaptionSplit, images_per_block: int = 256) -> Iterator[torch.Tensor]:
    """Every region row of ``split``'s precomputed features, as float32 blocks ``(images x R, D)`` (half-precision
    features read as stored and widened by torch, ``float_rows``: for Flickr8K's 6000 x 49 x 1280 cells 0.8 s
    against 4 s for numpy's cast)."""
    features = split.region_features
    for start in range(0, features.shape[0], images_per_block):
        block = float_rows(np.array(features[start: start + images_per_block]))
        yield block.reshape(-1, block.shape[-1])


@torch.no_grad()
def project_regions(split: CaptionSplit, reduction: torch.nn.Module, images_per_block: int = 256) -> CaptionSplit:
    """``split`` with its region features replaced by their frozen projection (float32, in memory), computed once so
    that no training step or validation pays for it (the image tower takes projected features as they are)."""
    features = split.region_features
    out = np.empty((*features.shape[:2], reduction.out_dim), dtype=np.float32)
    device = reduction.mean.device
    for start, block in zip(range(0, features.shape[0], images_per_block), region_rows(split, images_per_block)):
        projected = reduction(block.to(device)).cpu().numpy()
        out[start: start + images_per_block] = projected.reshape(-1, features.shape[1], reduction.out_dim)
    return dataclasses.replace(split, region_features=out)


def train_retrieval(cfg: RetrievalTrainConfig, out_dir: Path, *, resume: bool = True, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Train per ``cfg`` into ``out_dir`` (held locked for the run). ``resume``: continue from ``out_dir/last.pt``
    when it exists; ``overwrite``: delete the run already there and start over (without it, starting over where a
    run exists is refused). ``progress=False`` silences the run whatever ``run.progress`` says. SIGINT / SIGTERM
    save a checkpoint and raise ``RunInterrupted``.

    Returns ``{"best_rsum", "best_epoch", "last", "best", "val_rsum_by_epoch" (the validation curve, from the log),
    "train_seconds" (the loop's wall time up to its last checkpoint, over every session; None for a run whose
    checkpoints did not record it)}``."""
    folder = RunFolder(out_dir)
    return run_loop(folder, cfg.run.device, progress,
                    lambda verbose, stop, world: _train(cfg, folder, resume, overwrite, verbose, stop, world))


def _summary(folder: RunFolder, progress: TrainingProgress) -> dict:
    curve = {int(r["epoch"]): float(r["val_rsum"]) for r in read_jsonl(folder.log) if "val_rsum" in r} \
        if folder.log.is_file() else {}
    seconds = None if math.isnan(progress.train_seconds) else progress.train_seconds
    return {"best_rsum": progress.best_rsum, "best_epoch": progress.best_epoch, "last": folder.last,
            "best": folder.best, "val_rsum_by_epoch": curve, "train_seconds": seconds}


def _train(cfg: RetrievalTrainConfig, folder: RunFolder, resume: bool, overwrite: bool, verbose: bool,
           stop: StopSignals, world: World) -> dict:
    checkpointer = Checkpointer(folder, *RETRIEVAL_CHECKPOINT, resumable=RESUMABLE)
    device, threads = start_run(cfg.run)
    precision = Precision(cfg.run.amp, device)
    train_split = open_split(cfg.data.path, cfg.data.train_split, key="data.path")
    val_split = open_split(cfg.data.path, cfg.data.val_split, key="data.path")
    if cfg.model.text_input == "token_features":  # locked text: the frozen model's cached states
        train_split, val_split = attach_token_features([train_split, val_split], cfg.data.path,
                                                       cfg.model.text_model)
    if cfg.data.val_max_images:
        val_split = val_split.subset(np.arange(min(cfg.data.val_max_images, val_split.num_images)))
    check_input(train_split, cfg.model)
    train_guides = split_guides(cfg.model, train_split, device)
    val_guides = split_guides(cfg.model, val_split, device)
    inputs = inputs_record(cfg.model, train_split, train_guides.sha256)

    state = checkpointer.start_together(cfg, resume, overwrite, world)  # a refusal ends every rank at once
    if state is not None and state.get("clip_sha256") != train_guides.sha256:
        raise CheckpointError(f"{folder.last} was trained with CGE guides of another CLIP checkpoint than the "
                              f"cache's now; use another --out folder or --no-resume --overwrite")
    vocab = None
    if cfg.model.text_encoder == "bigru":
        vocab = Vocabulary(state["vocab"]) if state else Vocabulary.build(train_split.captions,
                                                                          cfg.data.vocab_min_count)
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, vocab)
    model = cuda_layout(USERModel(cfg.model, cfg.loss, vocab_size=tokenizer.vocab_size).to(device), device)
    model.set_world(world)
    if cfg.run.compile:
        model.compile_towers()
    train_step = data_parallel(model, world, device)  # the training forward; its backward averages the gradients
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.optim.lr, cfg.optim.text_lr_scale,
                                                         cfg.optim.weight_decay, cfg.optim.backbone_lr_scale,
                                                         cfg.optim.decay_all_parameters),
                                  fused=True)  # one kernel for all parameters: a quarter of the loop's time on CPU
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.optim.lr_decay_epochs, cfg.optim.lr_decay_factor)
    model_stream = TorchStream(derived_seed(cfg.run.seed, MODEL_STREAM), device)
    progress = TrainingProgress()
    if state is None and cfg.model.region_pca_dim is not None:  # a resumed run restores the fitted projection
        announce(f"fitting the {cfg.model.region_dim} -> {cfg.model.region_pca_dim} PCA of the region features on "
                 f"{train_split.num_images} training images", verbose)
        model.fit_region_reduction(region_rows(train_split))
    if state is not None:
        restore_states(state, folder.last, model=model, optimizer=optimizer, scheduler=scheduler,
                       model_stream=model_stream)
        precision.load_state_dict(state.get("grad_scaler"))
        progress.load_state_dict(state, folder.last)
        if epochs_all_done(checkpointer, progress, cfg.optim.epochs, verbose):
            return _summary(folder, progress)
        if world.is_main and progress.step_in_epoch == 0 and progress.best_epoch == progress.epoch > 0 and not (
                folder.best.is_file() and filecmp.cmp(folder.last, folder.best, shallow=False)):
            # a stop between last.pt and best.pt: best.pt is this very state
            atomic_write_bytes(folder.best, lambda handle: handle.write(folder.last.read_bytes()))
    if cfg.model.region_pca_dim is not None:  # both splits once, rather than the validation cells every epoch
        train_split, val_split = (project_regions(split, model.image_encoder.reduction)
                                  for split in (train_split, val_split))
    if cfg.loss.name == "uto":
        announce("note: the UTO loss goes below zero as training succeeds (its positive term is "
                 "-log(1 + similarity)); lower is better", verbose and state is None)
    if world.is_main:
        folder.write_config(cfg)
    logger = StepLogger(folder, verbose and cfg.run.progress, state["log_bytes"] if state else 0,
                        writes=world.is_main, report_to=cfg.run.report_to, resumed_step=progress.global_step)

    dataset = CaptionPairs(train_split, tokenizer, image_transform(cfg.model, model, cfg.data.image_size,
                                                                   cfg.data.augment_images),
                           augment_captions=cfg.data.augment_captions, seed=cfg.run.seed,
                           clip_image=train_guides.image, clip_text=train_guides.text)
    eval_transform = image_transform(cfg.model, model, cfg.data.image_size, train=False)
    collate = Collate(tokenizer.pad_id)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def checkpoint(path: Path) -> None:
        if path == folder.last:  # best.pt, written next, records the same time
            progress.lap()
        if not world.is_main:
            return
        checkpointer.save(path, cfg, {
            "vocab": None if vocab is None else vocab.words,
            **capture_states(model=model, optimizer=optimizer, scheduler=scheduler, model_stream=model_stream),
            **progress.state_dict(), "clip_sha256": train_guides.sha256, "log_bytes": logger.size(), "inputs": inputs,
            "world_size": world.size, "grad_scaler": precision.state_dict()})

    pending = PendingLosses(world, device)
    progress.start_clock()
    while progress.epoch < cfg.optim.epochs:
        epoch = progress.epoch
        dataset.set_epoch(epoch)
        model.set_epoch(epoch)
        model.train()
        batches = rank_batches(epoch_batches(len(dataset), cfg.optim.batch_size * world.size, cfg.run.seed, epoch,
                                             cfg.optim.max_steps_per_epoch), world)
        loader = DataLoader(dataset, batch_sampler=batches[progress.step_in_epoch:], collate_fn=collate,
                            num_workers=cfg.data.num_workers, persistent_workers=False,
                            pin_memory=device.type == "cuda",
                            generator=seeded_generator(cfg.run.seed, LOADER_STREAM, epoch))
        # without loader workers, each next batch is read on a side thread during the step (CPU)
        bar = logger.bar(fetched_ahead(loader, cfg.data.num_workers == 0 and device.type == "cpu"), len(batches),
                         progress.step_in_epoch, f"epoch {epoch + 1}/{cfg.optim.epochs}", "batch")
        tic, seen = time.perf_counter(), 0
        for batch in bar:
            threads.update()  # fewer threads while other processes hold cores
            batch = to_device(batch, device)
            with model_stream.active(), precision.autocast():
                losses = train_step(batch)
            loss = losses["loss"]
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            precision.unscale(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.grad_clip)
            if progress.global_step == 0 and float(grad_norm) == 0.0:
                raise TrainingStalled(
                    f"the {cfg.loss.name} loss ({float(loss.detach()):.4g}) gives no gradient at the first step: with "
                    f"UTO this happens when every matching image-caption similarity starts <= 0; set "
                    f"loss.uto_warmup_epochs=1 (a VSE++ hinge warm-up) or another seed")
            precision.step(optimizer)
            model.momentum_step()
            progress.add_step()
            pending.add(loss)
            seen += batch["tokens"].shape[0] * world.size
            logging = progress.global_step % cfg.run.log_every == 0
            saving = bool(cfg.run.checkpoint_every) and progress.global_step % cfg.run.checkpoint_every == 0
            if not (logging or saving or progress.step_in_epoch == len(batches)):
                continue  # between sync points a step reads nothing back from the device
            loss_value, loss_total, steps_read = pending.read()  # every rank checks the same values
            check_finite(loss_total, f"epoch {epoch + 1}, step {progress.step_in_epoch}", folder)
            progress.add_losses(loss_total, steps_read)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{seen / max(time.perf_counter() - tic, 1e-9):.0f}")
            if logging:
                logger.log({"step": progress.global_step, "epoch": epoch + 1, "loss": loss_value,
                            "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
                            **{f"loss_{k}": v.item() for k, v in losses.items() if k != "loss"}})
            if saving:
                checkpoint(folder.last)
            if stop.agreed(world, device):
                bar.close()
                checkpoint(folder.last)
                raise stop.interrupted(f"epoch {epoch + 1}, step {progress.step_in_epoch}", folder)
        bar.close()

        metrics = None
        if world.is_main:  # validation on rank 0, over the whole val split
            img, txt = encode_split(model, val_split, tokenizer, eval_transform, device,
                                    num_workers=cfg.data.num_workers, guides=val_guides)
            metrics = evaluate_embeddings(img, txt, val_split.caption_image, protocols=("all",))["all"]
        rsum = broadcast_from_main(metrics.rsum if metrics else 0.0, world, device)
        scheduler.step()
        loss_mean, improved = progress.end_epoch(rsum, metrics.as_dict() if metrics else None)
        if metrics is not None:
            logger.log({"step": progress.global_step, "epoch": progress.epoch, "train_loss_mean": loss_mean,
                        "samples_per_s": seen / max(time.perf_counter() - tic, 1e-9),
                        "peak_memory_mib": peak_memory_mib(device),
                        **{f"val_{k}": v for k, v in metrics.as_dict().items()}})
            logger.note(f"epoch {progress.epoch}: val rSum {metrics.rsum:.2f} (R@1 i2t {metrics.i2t_r1:.1f}, "
                        f"t2i {metrics.t2i_r1:.1f}){'  best' if improved else ''}")
        checkpoint(folder.last)  # then best.pt: a stop between the two is healed on resume (see above)
        if improved:
            checkpoint(folder.best)
        stopping = stop.agreed(world, device)
        logger.plot(final=stopping or progress.epoch == cfg.optim.epochs)
        if stopping:
            raise stop.interrupted(f"the end of epoch {progress.epoch}", folder)
    return _summary(folder, progress)
