"""Time and memory of one ST-SLidR pretraining step on CPU for a 30k-point synthetic sweep.

    python benchmarks/distill_step.py [--config configs/distill_synthetic.yaml] [--points 30000] [--steps 10]
        [--threads 1] [--set KEY=VALUE ...] [--out runs/bench/distill_step/default]

One built-in scene of ``--points`` lidar returns (the config's cameras and image size) is prepared once (SLIC,
frozen backbone maps, per-superpixel z: timed separately), then ``--steps`` full training steps (voxelise + augment,
3D U-Net, 2D head, superpixel pooling, loss, backward, optimiser) are timed after one warm-up step; the 3D network's
forward and forward + backward are also timed alone. Memory: peak resident set size of the process
(``resource.getrusage``) after the preparation and after the steps (what the steps add to the peak). Figures in
OUT/figures.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from figures import parse_with_out, write_figures
from timing import repeat_seconds

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.networks import build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.preparation import load_scenes, prepare_scene, voxelize_scenes
from xmcl.distill.schedule import build_optimizer
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.runtime.rng import seeded_generator


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/distill_synthetic.yaml"))
    parser.add_argument("--points", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parse_with_out(parser, "distill_step", argv=argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DistillConfig, args.config, ["data.pretrain_scenes=1", f"data.num_points={args.points}",
                                                   "optim.batch_scenes=1", "run.device=cpu"] + args.overrides)
    device = torch.device("cpu")
    torch.manual_seed(0)
    net, head, loss_fn = build_voxel_net(cfg.voxel), build_image_head(cfg), build_distill_loss(cfg)
    optimizer, _ = build_optimizer(list(net.parameters()) + list(head.head.parameters()), cfg.optim)
    rss_start = peak_rss_mib()

    began = time.perf_counter()
    scene = load_scenes(cfg.data, "pretrain")[0]
    generated = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = SuperpixelCache(cache_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                cfg.superpixels.sigma)
        began = time.perf_counter()
        prepared = prepare_scene(scene, head, cache, device, loss_fn.needs_semantic)
        preparation = time.perf_counter() - began
    rss_prepared = peak_rss_mib()

    step_index = iter(range(1_000_000))

    def train_step() -> None:
        generator = seeded_generator(cfg.run.seed, 0, next(step_index)) if cfg.data.augment else None
        loss, _ = distillation_loss(net, head, loss_fn, [prepared], cfg.voxel, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net.train()
    head.train()
    step_times = repeat_seconds(train_step, args.steps)
    rss_steps = peak_rss_mib()
    voxels = voxelize_scenes([prepared.points], cfg.voxel, None)

    def forward() -> None:
        with torch.no_grad():
            net(voxels)

    def forward_backward() -> None:
        net(voxels).sum().backward()

    fwd = repeat_seconds(forward, args.steps)
    fwd_bwd = repeat_seconds(forward_backward, args.steps)
    _, k = distillation_loss(net, head, loss_fn, [prepared], cfg.voxel, None)

    print(f"scene: {scene.num_points} points, {voxels.coords.shape[0]} voxels of {cfg.voxel.voxel_size} m, "
          f"{len(scene.cameras)} cameras {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
          f"{prepared.pair_point.shape[0]} point-pixel pairs, {k} superpixels with points")
    print(f"network: VoxelUNet widths {cfg.voxel.widths}, {sum(p.numel() for p in net.parameters())} parameters; "
          f"2D {cfg.image.backbone} (frozen, input x{cfg.image.input_scale}); loss tolerance={cfg.loss.tolerance} "
          f"balance={cfg.loss.balance}; torch threads {torch.get_num_threads()}")
    print(f"one-off: scene generation {generated:.2f} s, preparation (SLIC, backbone, z) {preparation:.2f} s")
    print(f"training step (1 scene): median {1000 * statistics.median(step_times):.0f} ms, "
          f"min {1000 * min(step_times):.0f} ms over {args.steps} steps "
          f"-> {1 / statistics.median(step_times):.2f} scenes/s")
    print(f"3D network alone: forward {1000 * statistics.median(fwd):.0f} ms, "
          f"forward + backward {1000 * statistics.median(fwd_bwd):.0f} ms (median)")
    print(f"peak RSS: {rss_start:.0f} MiB after building the models, {rss_prepared:.0f} MiB after preparation, "
          f"{rss_steps:.0f} MiB after the steps (+{rss_steps - rss_prepared:.0f} MiB)")

    write_figures(args.out, "distill_step", args, {
        "points": scene.num_points, "voxels": int(voxels.coords.shape[0]), "voxel_size": cfg.voxel.voxel_size,
        "cameras": len(scene.cameras), "image_size": list(cfg.data.image_size),
        "pairs": int(prepared.pair_point.shape[0]), "superpixels": int(k),
        "parameters": sum(p.numel() for p in net.parameters()), "widths": list(cfg.voxel.widths),
        "generation_s": generated, "preparation_s": preparation,
        "step_median_ms": 1000 * statistics.median(step_times), "step_min_ms": 1000 * min(step_times),
        "scenes_per_s": 1 / statistics.median(step_times), "forward_ms": 1000 * statistics.median(fwd),
        "forward_backward_ms": 1000 * statistics.median(fwd_bwd), "rss_models_mib": rss_start,
        "rss_prepared_mib": rss_prepared, "rss_steps_mib": rss_steps},
        config={"distill_config": cfg})


if __name__ == "__main__":
    main()
