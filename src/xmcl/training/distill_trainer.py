"""The ST-SLidR pretraining loop, written out: distil a frozen 2D backbone into the sparse-voxel 3D network by
superpixel contrast (the objective: ``xmcl.distill.objective``; the data: ``xmcl.distill.preparation``).

Run folder: ``last.pt`` (3D network, 2D head, optimiser, scheduler, RNG, step; written atomically every
``run.checkpoint_every`` steps and at the end), ``config.yaml``, ``log.jsonl``, ``curves.png``. Resuming restarts
from ``last.pt`` and reproduces the uninterrupted run exactly on the same device, wherever it stopped (even by
``kill -9``): the scene order and augmentation of step ``s`` are drawn from generators seeded by
``(run.seed, purpose, s)``, anything the networks draw from torch's global generator runs on their own
``TorchStream`` (saved in ``last.pt``), and log records written after the resumed checkpoint are dropped.
"""

from __future__ import annotations

import time
from pathlib import Path

from xmcl.distill.config import DistillConfig
from xmcl.distill.networks import DISTILL_CHECKPOINT, build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.preparation import DistillInputs, batch_indices
from xmcl.distill.schedule import build_optimizer
from xmcl.distill.sources import open_scans
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.runtime.rng import TorchStream, derived_seed, seeded_generator
from xmcl.runtime.run_config import start_run
from xmcl.training.run import (
    Checkpointer,
    RunFolder,
    StepLogger,
    StopSignals,
    announce,
    capture_states,
    check_finite,
    restore_states,
)

# May change when a run resumes: the probe's settings and scene counts, and where superpixels are cached.
RESUMABLE = ("probe.", "data.probe_train_scenes", "data.eval_scenes", "superpixels.cache_dir")
MODEL_STREAM = 3  # purpose of the 3D network's random stream drawn from run.seed (0, 1: augmentation, scene order)


def pretrain_distill(cfg: DistillConfig, out_dir: Path, resume: bool = True, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Pretrain the 3D network of ``cfg`` into ``out_dir`` (held locked for the run); returns the final checkpoint
    (``out_dir/last.pt``). ``resume`` / ``overwrite`` as for ``train_retrieval``; ``progress=False`` silences the
    run. SIGINT / SIGTERM save a checkpoint and raise ``RunInterrupted``."""
    folder = RunFolder(out_dir)
    with folder.locked(progress), StopSignals(progress) as stop:
        return _pretrain(cfg, folder, resume, overwrite, progress, stop)


def _pretrain(cfg: DistillConfig, folder: RunFolder, resume: bool, overwrite: bool, verbose: bool,
              stop: StopSignals) -> Path:
    checkpointer = Checkpointer(folder, *DISTILL_CHECKPOINT, resumable=RESUMABLE)
    device = start_run(cfg.run)
    net = build_voxel_net(cfg.voxel).to(device)
    head = build_image_head(cfg).to(device)
    loss_fn = build_distill_loss(cfg)
    trainable = list(net.parameters()) + list(head.head.parameters())
    optimizer, scheduler = build_optimizer(trainable, cfg.optim)
    model_stream = TorchStream(derived_seed(cfg.run.seed, MODEL_STREAM), device)
    start = 0
    state = checkpointer.start(cfg, resume, overwrite)
    if state is not None:
        restore_states(state, folder.last, voxel_net=net, image_head=head.head, optimizer=optimizer,
                       scheduler=scheduler, model_stream=model_stream)
        start = int(state["step"])
        if start >= cfg.optim.steps:
            announce(f"{folder.root} already finished: {start} of {cfg.optim.steps} steps done; nothing to do. Set "
                     f"a larger optim.steps to train longer, or pass --no-resume --overwrite to start over", verbose)
            return folder.last
        announce(f"resuming {folder.last} from step {start} of {cfg.optim.steps}", verbose)
    folder.write_config(cfg)
    logger = StepLogger(folder, verbose and cfg.run.progress, state["log_bytes"] if state else 0)

    def save(step: int, last_loss: float) -> None:
        checkpointer.save(folder.last, cfg, {
            "step": step, "loss": last_loss, "log_bytes": logger.size(),
            **capture_states(voxel_net=net, image_head=head.head, optimizer=optimizer, scheduler=scheduler,
                             model_stream=model_stream)})

    sp_dir = cfg.superpixels.cache_dir if cfg.superpixels.cache_dir is not None else folder.root / "superpixels"
    superpixels = SuperpixelCache(sp_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                  cfg.superpixels.sigma)
    inputs = DistillInputs(open_scans(cfg.data, "pretrain"), head, superpixels, device, loss_fn.needs_semantic,
                           cfg.augmentation if cfg.data.augment else None, cfg.run.seed,
                           keep_in_memory=cfg.data.source == "synthetic")
    inputs.warm(verbose and cfg.run.progress)
    net.train()
    head.train()
    bar = logger.bar(range(start, cfg.optim.steps), cfg.optim.steps, start, "pretrain")
    for step in bar:
        began = time.perf_counter()
        generator = seeded_generator(cfg.run.seed, 0, step)
        batch = inputs.batch(batch_indices(len(inputs), cfg.optim.batch_scenes, cfg.run.seed, step), step)
        with model_stream.active():
            loss, num_superpixels = distillation_loss(net, head, loss_fn, batch, cfg.voxel,
                                                      generator if cfg.data.augment else None)
        loss_value = loss.item()
        check_finite(loss_value, f"step {step}", folder)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        scenes_per_s = len(batch) / (time.perf_counter() - began)
        bar.set_postfix(loss=f"{loss_value:.4f}", scenes_per_s=f"{scenes_per_s:.2f}")
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.optim.steps:
            logger.log({"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                        "superpixels": num_superpixels, "scenes_per_s": scenes_per_s})
        if (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or done == cfg.optim.steps \
                or stop.requested:
            save(done, loss_value)
        if stop.requested and done < cfg.optim.steps:
            bar.close()
            raise stop.interrupted(f"step {done} of {cfg.optim.steps}", folder)
    logger.plot()
    return folder.last
