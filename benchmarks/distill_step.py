"""Time and memory of one ST-SLidR pretraining step for a 30k-point synthetic sweep, augmentations on.

    python benchmarks/distill_step.py [--config configs/distill_synthetic.yaml] [--points 30000] [--steps 10]
        [--threads 1] [--device cpu] [--authors-net] [--set KEY=VALUE ...]

One built-in scene of ``--points`` lidar returns (the config's cameras and image size) is generated, its fixed part
(SLIC superpixels, point-pixel pairs) prepared once (timed), then ``--steps`` full training steps are timed after one
warm-up step: the authors' mixed augmentations (DropCuboids, ResizedCrop, horizontal flip) and the frozen
backbone's pass over the augmented images (timed on their own too: the part that cannot be cached once the images
change every step), voxelising with the point augmentation, the 3D network, the 2D head, superpixel pooling, the
loss, backward and the optimiser. The 3D network's forward and forward + backward are also timed alone.
``--authors-net`` uses the authors' 3D network shape (``voxel.architecture=res16unet``: Res16UNet34C, planes
32..96, layers 2,3,4,6,2,2,2,2). Memory: peak resident set size of the process (``resource.getrusage``) after the
preparation and after the steps, and on a CUDA device the peak allocated GPU memory of the steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from figures import command_lines, conditions, options, parse_with_out, table, write_figures
from timing import peak_rss_mib, repeat_seconds

from xmcl.config import load_config
from xmcl.distill.augment import augment_scan
from xmcl.distill.config import DistillConfig
from xmcl.distill.networks import build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.preparation import DistillInputs, prepare_cameras, voxelize_scenes
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.runtime.rng import seeded_generator
from xmcl.training.schedule import build_optimizer

AUTHORS_NET = ["voxel.architecture=res16unet", "voxel.bn_momentum=0.05"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/distill_synthetic.yaml"))
    parser.add_argument("--points", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--authors-net", action="store_true", help="3D network: " + " ".join(AUTHORS_NET))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parse_with_out(parser, "distill_step", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: the step, its parts, the preparation and the peak memory."""
    f = d["figures"]
    rows = [["training step, 1 scene", f"median {f['step_median_ms']:.0f} ms, min {f['step_min_ms']:.0f} ms → "
                                       f"{f['scenes_per_s']:.2f} scenes/s"],
            ["frozen 2D backbone on the augmented images (every step: not cacheable)",
             f"{f['augment_backbone_ms']:.0f} ms"],
            ["3D network forward", f"{f['forward_ms']:.0f} ms"],
            ["3D network forward + backward", f"{f['forward_backward_ms']:.0f} ms"],
            ["one-off preparation (SLIC, backbone, z)", f"{f['preparation_s']:.2f} s"],
            ["peak RSS after building the models", f"{f['rss_models_mib']:.0f} MiB"],
            ["peak RSS after preparation", f"{f['rss_prepared_mib']:.0f} MiB"],
            ["peak RSS after the steps", f"{f['rss_steps_mib']:.0f} MiB"]]
    return (f"{command_lines(d)}\n\nCloud: {f['points']:,} points → {f['voxels']:,} voxels of {f['voxel_size']} m; "
            f"{f['cameras']} cameras at {f['image_size'][0]}×{f['image_size'][1]}; {f['superpixels']} superpixels with "
            f"points. 3D network: {f['network']}, {f['parameters'] / 1e6:.2f} M parameters.\n\n"
            + table(["what", "figure"], rows))


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    return (f"- `{d['command']}`: an ST-SLidR step on a {f['points']:,}-point cloud takes "
            f"{f['step_median_ms'] / 1000:.1f} s on {d['machine']['torch_threads']} torch thread(s), with "
            f"{f['rss_steps_mib'] / 1024:.1f} GiB peak RSS ({conditions(d)}).")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["data.pretrain_scenes=1", f"data.num_points={args.points}", "optim.batch_scenes=1",
                 f"run.device={args.device}"] + (AUTHORS_NET if args.authors_net else []) + args.overrides
    cfg = load_config(DistillConfig, args.config, overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net, head = build_voxel_net(cfg.voxel).to(device), build_image_head(cfg).to(device)
    loss_fn = build_distill_loss(cfg)
    optimizer, _ = build_optimizer(list(net.parameters()) + list(head.head.parameters()), cfg.optim)
    rss_start = peak_rss_mib()

    began = time.perf_counter()
    scans = open_scans(cfg.data, "pretrain")
    scene = scans[0]
    generated = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = SuperpixelCache(cache_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                cfg.superpixels.sigma)
        inputs = DistillInputs(scans, head, cache, device, loss_fn.needs_semantic,
                               cfg.augmentation if cfg.data.augment else None, cfg.run.seed, keep_in_memory=True)
        began = time.perf_counter()
        inputs.warm(progress=False)
        preparation = time.perf_counter() - began
    rss_prepared = peak_rss_mib()
    points, cams = inputs.fixed_inputs(0)
    step_index = iter(range(1_000_000))

    def train_step() -> None:
        step = next(step_index)
        batch = inputs.batch([0], step)
        generator = seeded_generator(cfg.run.seed, 0, step) if cfg.data.augment else None
        loss, _ = distillation_loss(net, head, loss_fn, batch, cfg.voxel, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)

    def augment_and_backbone() -> None:
        moved_points, moved = augment_scan(points, cams, cfg.augmentation, seeded_generator(0, 9, next(step_index)))
        prepare_cameras(moved_points, moved, head, loss_fn.needs_semantic)
        synchronize(device)

    net.train()
    head.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times = repeat_seconds(train_step, args.steps)
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rss_steps = peak_rss_mib()
    image_times = repeat_seconds(augment_and_backbone, args.steps)
    voxels = voxelize_scenes([points], cfg.voxel, None)

    def forward() -> None:
        with torch.no_grad():
            net(voxels)
        synchronize(device)

    def forward_backward() -> None:
        net(voxels).sum().backward()
        synchronize(device)

    fwd = repeat_seconds(forward, args.steps)
    fwd_bwd = repeat_seconds(forward_backward, args.steps)
    batch = inputs.batch([0], 0)
    _, k = distillation_loss(net, head, loss_fn, batch, cfg.voxel, None)

    shape = (f"Res16UNet planes {cfg.voxel.planes} layers {cfg.voxel.layers}" if cfg.voxel.architecture == "res16unet"
             else f"VoxelUNet widths {cfg.voxel.widths}")
    write_figures(args.out, "distill_step", args, {
        "points": scene.num_points, "voxels": int(voxels.coords.shape[0]), "voxel_size": cfg.voxel.voxel_size,
        "coordinates": cfg.voxel.coordinates, "network": shape, "cameras": len(scene.cameras),
        "image_size": list(cfg.data.image_size), "pairs": int(batch[0].pair_point.shape[0]), "superpixels": int(k),
        "parameters": sum(p.numel() for p in net.parameters()), "device": str(device),
        "generation_s": generated, "preparation_s": preparation,
        "step_median_ms": 1000 * statistics.median(step_times), "step_min_ms": 1000 * min(step_times),
        "scenes_per_s": 1 / statistics.median(step_times),
        "augment_backbone_ms": 1000 * statistics.median(image_times), "forward_ms": 1000 * statistics.median(fwd),
        "forward_backward_ms": 1000 * statistics.median(fwd_bwd), "rss_models_mib": rss_start,
        "rss_prepared_mib": rss_prepared, "rss_steps_mib": rss_steps, "gpu_peak_mib": gpu_peak},
        config={"distill_config": cfg}, show=render)


if __name__ == "__main__":
    main()
