"""The ST-SLidR pretraining loop, written out: distil a frozen 2D backbone into the sparse-voxel 3D network by
superpixel contrast (the objective: ``xmcl.distill.objective``; the data: ``xmcl.distill.preparation``).

Run folder: ``last.pt`` (3D network, 2D head, optimiser, scheduler, RNG, step; written atomically every
``run.checkpoint_every`` steps and at the end), ``config.yaml``, ``log.jsonl``, ``curves.png``. Resuming restarts
from ``last.pt`` and reproduces the uninterrupted run exactly on the same device: the scene order and augmentation
of step ``s`` are drawn from generators seeded by ``(run.seed, purpose, s)``.
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
from xmcl.runtime.rng import seeded_generator
from xmcl.runtime.run_config import start_run
from xmcl.training.run import Checkpointer, RunFolder, StepLogger, capture_states, check_finite, restore_states

# May change when a run resumes: the probe's settings and scene counts, and where superpixels are cached.
RESUMABLE = ("probe.", "data.probe_train_scenes", "data.eval_scenes", "superpixels.cache_dir")


def pretrain_distill(cfg: DistillConfig, out_dir: Path, resume: bool = True) -> Path:
    """Pretrain the 3D network of ``cfg`` into ``out_dir``; returns the final checkpoint (``out_dir/last.pt``)."""
    folder = RunFolder(out_dir)
    checkpointer = Checkpointer(folder, *DISTILL_CHECKPOINT, resumable=RESUMABLE)
    device = start_run(cfg.run)
    net = build_voxel_net(cfg.voxel).to(device)
    head = build_image_head(cfg).to(device)
    loss_fn = build_distill_loss(cfg)
    trainable = list(net.parameters()) + list(head.head.parameters())
    optimizer, scheduler = build_optimizer(trainable, cfg.optim)
    start = 0
    state = checkpointer.resume_state(cfg, resume)
    if state is not None:
        restore_states(state, voxel_net=net, image_head=head.head, optimizer=optimizer, scheduler=scheduler)
        start = int(state["step"])
    folder.create(cfg)
    if start >= cfg.optim.steps:
        return folder.last

    def save(step: int, last_loss: float) -> None:
        checkpointer.save(folder.last, cfg, {
            "step": step, "loss": last_loss,
            **capture_states(voxel_net=net, image_head=head.head, optimizer=optimizer, scheduler=scheduler)})

    sp_dir = cfg.superpixels.cache_dir if cfg.superpixels.cache_dir is not None else folder.root / "superpixels"
    superpixels = SuperpixelCache(sp_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                  cfg.superpixels.sigma)
    inputs = DistillInputs(open_scans(cfg.data, "pretrain"), head, superpixels, device, loss_fn.needs_semantic,
                           cfg.augmentation if cfg.data.augment else None, cfg.run.seed,
                           keep_in_memory=cfg.data.source == "synthetic")
    inputs.warm(cfg.run.progress)
    logger = StepLogger(folder, cfg.run.progress)
    net.train()
    head.train()
    bar = logger.bar(range(start, cfg.optim.steps), cfg.optim.steps, start, "pretrain")
    for step in bar:
        began = time.perf_counter()
        generator = seeded_generator(cfg.run.seed, 0, step)
        batch = inputs.batch(batch_indices(len(inputs), cfg.optim.batch_scenes, cfg.run.seed, step), step)
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
        if (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or done == cfg.optim.steps:
            save(done, loss_value)
    logger.plot()
    return folder.last
