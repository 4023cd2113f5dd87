"""The ST-SLidR pretraining loop, written out: distil a frozen 2D backbone into the sparse-voxel 3D network by
superpixel contrast (the objective: ``xmcl.distill.objective``; the data: ``xmcl.distill.preparation``).

Run folder: ``last.pt`` (3D network, 2D head, optimiser, scheduler, RNG, progress record; written atomically every
``run.checkpoint_every`` steps and at the end), ``config.yaml``, ``log.jsonl``, ``curves.png``. Resuming restarts
from ``last.pt`` and reproduces the uninterrupted run exactly on the same device, wherever it stopped (even by
``kill -9``): the scene order and augmentation of step ``s`` are drawn from generators seeded by
``(run.seed, purpose, s)``, anything the networks draw from torch's global generator runs on their own
``TorchStream`` (saved in ``last.pt``), and log records written after the resumed checkpoint are dropped.

Data-parallel (``torchrun --nproc_per_node N -m xmcl distill pretrain ...``): ``optim.batch_scenes`` is one rank's
batch; every rank draws the same global batch of ``N * batch_scenes`` scenes from ``(run.seed, step)`` and takes its
slice (``training.sharding.rank_batches``); DistributedDataParallel averages the gradients (``Objective``).
``loss.gather`` says whose superpixels a rank contrasts: its own ("local", the default, as the authors' per-GPU loss) or
every rank's ("global": gathered with gradient, BatchNorm over every rank's sites; the step of one process with the
global batch). A rank > 0 augments from a stream of its own. Rank 0 holds the folder lock and writes the checkpoint,
config, log and curves (the logged loss is the mean over the ranks); a refusal at the start ends every rank at once with
its message; a stop signal on any rank stops them all at the same sync point (a log step or a checkpoint, where the
losses are also read and checked); ``last.pt`` records the world size and a resume with another is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from xmcl.contrast import STSlidrLoss
from xmcl.distill.config import DistillConfig, VoxelConfig
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.networks import DISTILL_CHECKPOINT, build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.preparation import DistillInputs, PreparedScene, batch_indices
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.distill.voxel_net import SparseUNet
from xmcl.errors import ConfigError
from xmcl.nn.global_batchnorm import set_world
from xmcl.nn.spconv_map import resolve_sparse_backend
from xmcl.runtime.device import peak_memory_mib
from xmcl.runtime.distributed import (
    SINGLE_PROCESS,
    World,
    data_parallel,
    mean_over_ranks,
)
from xmcl.runtime.precision import Precision, cuda_layout
from xmcl.runtime.rng import TorchStream, derived_seed, seeded_generator
from xmcl.runtime.run_config import start_run
from xmcl.training.progress import PendingLosses, TrainingProgress
from xmcl.training.run import (
    Checkpointer,
    RunFolder,
    StepLogger,
    StopSignals,
    announce_finished,
    announce_resume,
    capture_states,
    check_finite,
    restore_states,
    run_loop,
)
from xmcl.training.schedule import build_optimizer
from xmcl.training.sharding import rank_batches

# May change when a run resumes: the probe's settings and scene counts, and where superpixels are cached.
RESUMABLE = ("probe.", "data.probe_train_scenes", "data.eval_scenes", "superpixels.cache_dir",
             "voxel.sparse_backend")
MODEL_STREAM = 3  # purpose of the 3D network's random stream drawn from run.seed (0, 1: augmentation, scene order)


class Objective(nn.Module):
    """``distillation_loss`` of a batch as one module over the 3D network and the image head, the forward that
    data-parallel training wraps (``data_parallel``: the backward averages their gradients over the ranks)."""

    def __init__(self, net: SparseUNet, head: ImageFeatureHead, loss_fn: STSlidrLoss, voxel: VoxelConfig,
                 gather: World) -> None:
        super().__init__()
        self.net, self.head, self.loss_fn, self.voxel, self.gather = net, head, loss_fn, voxel, gather

    def forward(self, batch: list[PreparedScene], generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
        return distillation_loss(self.net, self.head, self.loss_fn, batch, self.voxel, generator, self.gather)


def pretrain_distill(cfg: DistillConfig, out_dir: Path, *, resume: bool = True, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Pretrain the 3D network of ``cfg`` into ``out_dir`` (held locked for the run); returns the final checkpoint
    (``out_dir/last.pt``). ``resume`` / ``overwrite`` as for ``train_retrieval``; ``progress=False`` silences the
    run. SIGINT / SIGTERM save a checkpoint and raise ``RunInterrupted``."""
    folder = RunFolder(out_dir)
    return run_loop(folder, cfg.run.device, progress,
                    lambda verbose, stop, world: _pretrain(cfg, folder, resume, overwrite, verbose, stop, world))


def _pretrain(cfg: DistillConfig, folder: RunFolder, resume: bool, overwrite: bool, verbose: bool,
              stop: StopSignals, world: World) -> Path:
    checkpointer = Checkpointer(folder, *DISTILL_CHECKPOINT, resumable=RESUMABLE)
    device, threads = start_run(cfg.run)
    precision = Precision(cfg.run.amp, device)
    resolve_sparse_backend(cfg.voxel.sparse_backend, device)  # refuse "spconv" without spconv before any work
    net = build_voxel_net(cfg.voxel).to(device)
    head = cuda_layout(build_image_head(cfg).to(device), device)
    loss_fn = build_distill_loss(cfg)
    gather = world if cfg.loss.gather == "global" else SINGLE_PROCESS
    set_world(net, gather)  # BatchNorm over every rank's sites with the global gather
    trainable = list(net.parameters()) + list(head.head.parameters())
    optimizer, scheduler = build_optimizer(trainable, cfg.optim)
    model_stream = TorchStream(derived_seed(cfg.run.seed, MODEL_STREAM), device)
    progress = TrainingProgress()
    state = checkpointer.start_together(cfg, resume, overwrite, world)  # a refusal ends every rank at once
    if state is not None:
        restore_states(state, folder.last, voxel_net=net, image_head=head.head, optimizer=optimizer,
                       scheduler=scheduler, model_stream=model_stream)
        precision.load_state_dict(state.get("grad_scaler"))
        progress.load_state_dict(state, folder.last)
        if progress.global_step >= cfg.optim.steps:
            announce_finished(checkpointer, f"{progress.global_step} of {cfg.optim.steps} steps done", "optim.steps",
                              verbose)
            return folder.last
        announce_resume(folder, f"step {progress.global_step} of {cfg.optim.steps}", verbose)
    start = progress.global_step
    if world.is_main:
        folder.write_config(cfg)
    logger = StepLogger(folder, verbose and cfg.run.progress, state["log_bytes"] if state else 0,
                        writes=world.is_main, report_to=cfg.run.report_to, resumed_step=start)

    def save(last_loss: float) -> None:
        progress.lap()
        if not world.is_main:
            return
        checkpointer.save(folder.last, cfg, {
            **progress.state_dict(), "loss": last_loss, "log_bytes": logger.size(), "world_size": world.size,
            "grad_scaler": precision.state_dict(),
            **capture_states(voxel_net=net, image_head=head.head, optimizer=optimizer, scheduler=scheduler,
                             model_stream=model_stream)})

    sp_dir = cfg.superpixels.cache_dir if cfg.superpixels.cache_dir is not None else folder.root / "superpixels"
    superpixels = SuperpixelCache(sp_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                  cfg.superpixels.sigma)
    inputs = DistillInputs(open_scans(cfg.data, "pretrain"), head, superpixels, device, loss_fn.needs_semantic,
                           cfg.augmentation if cfg.data.augment else None, cfg.run.seed,
                           keep_in_memory=cfg.data.source == "synthetic")
    global_scenes = cfg.optim.batch_scenes * world.size
    if world.distributed and global_scenes > len(inputs):
        raise ConfigError(f"optim.batch_scenes={cfg.optim.batch_scenes} per rank x {world.size} ranks = "
                          f"{global_scenes} scenes a step, more than the {len(inputs)} pretraining scenes: lower "
                          f"optim.batch_scenes or the number of ranks")
    inputs.warm(verbose and cfg.run.progress)  # every rank its own (superpixel cache files are written atomically)
    net.train()
    head.train()
    train_step = data_parallel(Objective(net, head, loss_fn, cfg.voxel, gather), world, device)  # grads averaged
    bar = logger.bar(range(start, cfg.optim.steps), cfg.optim.steps, start, "pretrain")
    pending = PendingLosses(world, device)
    progress.start_clock()
    for step in bar:
        threads.update()  # fewer threads while other processes hold cores
        began = time.perf_counter()
        generator = seeded_generator(cfg.run.seed, 0, step, *([world.rank] if world.rank else []))
        scenes = rank_batches([batch_indices(len(inputs), global_scenes, cfg.run.seed, step)], world, min_share=1)
        batch = inputs.batch(scenes[0], step, world.rank)
        with model_stream.active(), precision.autocast():
            loss, num_superpixels = train_step(batch, generator if cfg.data.augment else None)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        scheduler.step()
        progress.add_step()
        pending.add(loss)
        done = progress.global_step
        logging = done % cfg.run.log_every == 0 or done == cfg.optim.steps
        saving = bool(cfg.run.checkpoint_every) and done % cfg.run.checkpoint_every == 0
        if not (logging or saving):
            continue  # between sync points a step reads nothing back from the device
        loss_value, loss_total, steps_read = pending.read()  # every rank checks the same values
        check_finite(loss_total, f"step {done}" if steps_read == 1 else f"steps {done - steps_read + 1}-{done}",
                     folder)
        progress.add_losses(loss_total, steps_read)
        stopping = stop.agreed(world, device)
        scenes_per_s = len(batch) * world.size / (time.perf_counter() - began)
        bar.set_postfix(loss=f"{loss_value:.4f}", scenes_per_s=f"{scenes_per_s:.2f}")
        if logging:
            num_superpixels = round(mean_over_ranks(float(num_superpixels), world, device) * world.size)
            logger.log({"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                        "superpixels": num_superpixels, "scenes_per_s": scenes_per_s,
                        "peak_memory_mib": peak_memory_mib(device)})
        if saving or done == cfg.optim.steps or stopping:
            save(loss_value)
        if stopping and done < cfg.optim.steps:
            bar.close()
            raise stop.interrupted(f"step {done} of {cfg.optim.steps}", folder)
    logger.plot(final=True)
    return folder.last
