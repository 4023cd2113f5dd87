"""xmcl's two sparse-convolution backends on one synthetic lidar sweep: plain PyTorch (``CoordinateMap``) against
spconv's kernels (``SpconvMap``, ``voxel.sparse_backend: spconv``).

    python benchmarks/sparse_conv_backends.py [--config configs/distill_synthetic.yaml] [--points 30000]
        [--widths 32 64 128] [--repeats 7] [--threads 1] [--out runs/bench/sparse_conv_backends/default]

One built-in scene of ``--points`` lidar returns is voxelised as in pretraining (the config's voxel size, no
augmentation). For each width C, a C -> C 3x3x3 submanifold conv and a C -> C 2x2x2 stride-2 downsampling conv (the
same layer and weights on each backend's map) get random input features. Their outputs and the gradients of the
input features and the weights (for the same random output gradient, matched by output site) are compared; then
forward + backward (``torch.autograd.grad`` of both) is timed with the maps already built, as a network reuses
them. Building the maps is timed on its own: ``CoordinateMap(coords).neighbours()`` / ``.coarser()`` against
``SpconvMap.from_coordinates(coords).submanifold_pairs()`` / ``.coarser()``. Times are medians over ``--repeats``
calls after one warm-up call, in ms. Without spconv (``pip install 'xmcl[spconv]'``) only the torch backend is
timed. Figures (times, the largest differences, the spconv version) go to OUT/figures.json, and their block of
docs/results.md is printed.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
from pathlib import Path
from typing import Callable

import torch
from figures import command_lines, options, parse_with_out, table, write_figures
from timing import repeat_seconds
from torch import Tensor

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.preparation import load_scenes, scene_points, voxelize_scenes
from xmcl.nn.sparse_conv import (
    CoordinateMap,
    KernelMap,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    hash_coordinates,
)
from xmcl.nn.spconv_map import SpconvMap, spconv_importable


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1000 * statistics.median(repeat_seconds(fn, repeats))


def max_diff(a: Tensor, b: Tensor) -> float:
    """Max |a - b| relative to max |a|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def site_order(cmap: KernelMap) -> Tensor:
    """The rows of ``cmap``'s sites in sorted-key order (the torch backend's order)."""
    return torch.argsort(hash_coordinates(cmap.coords))


def compare(kind: str, channels: int, coords: Tensor, repeats: int) -> dict:
    """``kind`` ("submanifold" or "strided") at ``channels`` -> ``channels``: the times (ms; lists of torch's, then
    spconv's when present) and the relative differences of out, grad_in, grad_w."""
    subm = kind == "submanifold"
    torch.manual_seed(0)
    layer = SubmanifoldConv3d(channels, channels) if subm else StridedConv3d(channels, channels)
    features = torch.randn(coords.shape[0], channels, requires_grad=True)
    backends: list[tuple[Callable[[], KernelMap], Callable[[KernelMap], object]]] = [
        (lambda: CoordinateMap(coords), lambda m: m.neighbours() if subm else m.coarser())]
    if spconv_importable():
        backends.append((lambda: SpconvMap.from_coordinates(coords),
                         lambda m: m.submanifold_pairs() if subm else m.coarser()))
    maps, fwd_bwd, results = [], [], []
    grad_sorted = None
    for make, build in backends:
        maps.append(median_ms(lambda: build(make()), repeats))
        cmap = make()
        out = layer(SparseTensor(features, cmap))
        order = site_order(out.cmap)
        if grad_sorted is None:
            grad_sorted = torch.randn(out.features.shape, generator=torch.Generator().manual_seed(1))
        grad_out = torch.empty_like(grad_sorted).index_copy_(0, order, grad_sorted)  # the same per output site
        results.append((out.features[order], *torch.autograd.grad(out.features, (features, layer.weight), grad_out)))
        fwd_bwd.append(median_ms(lambda: torch.autograd.grad(layer(SparseTensor(features, cmap)).features,
                                                             (features, layer.weight), grad_out), repeats))
    figures = {"map_ms": maps, "forward_backward_ms": fwd_bwd}
    if len(results) == 2:
        figures["max_rel_diff"] = [max_diff(a, b) for a, b in zip(*results)]
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/distill_synthetic.yaml"))
    parser.add_argument("--points", type=int, default=30000)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    return parse_with_out(parser, "sparse_conv_backends", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: per layer, map building and forward + backward of each backend, their ratio and
    their largest difference."""
    f = d["figures"]
    with_spconv = f["spconv"] is not None
    header = ["layer", "width", "map torch"] + (["map spconv"] if with_spconv else []) + ["fwd+bwd torch"]
    header += ["fwd+bwd spconv", "spconv / torch", "max rel. diff"] if with_spconv else []
    rows = []
    for layer in f["layers"]:
        row = [layer["kind"], str(layer["channels"]), f"{layer['map_ms'][0]:.1f}"]
        if with_spconv:
            row.append(f"{layer['map_ms'][1]:.1f}")
        row.append(f"{layer['forward_backward_ms'][0]:.1f}")
        if with_spconv:
            row += [f"{layer['forward_backward_ms'][1]:.1f}", f"{layer['spconv_over_torch']:.2f}",
                    f"{max(layer['max_rel_diff']):.1e}"]
        rows.append(row)
    note = f"spconv {f['spconv']}" if with_spconv else "spconv not installed: the torch backend only"
    return f"{command_lines(d)}\n\n{f['voxels']:,} voxels; {note}; ms, medians:\n\n" + table(header, rows)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DistillConfig, args.config, ["data.pretrain_scenes=1", f"data.num_points={args.points}",
                                                   "data.num_cameras=1", "data.image_size=[16, 16]"])
    scene = load_scenes(cfg.data, "pretrain")[0]  # the lidar sweep does not depend on the cameras
    coords = voxelize_scenes([scene_points(scene, torch.device("cpu"))], cfg.voxel, None).coords
    coarse = CoordinateMap(coords).coarser()[0].num_sites
    layers = []
    for channels in args.widths:
        for kind in ("submanifold", "strided"):
            layer = {"kind": kind, "channels": channels, **compare(kind, channels, coords, args.repeats)}
            if len(layer["forward_backward_ms"]) == 2:
                layer["spconv_over_torch"] = layer["forward_backward_ms"][1] / layer["forward_backward_ms"][0]
            layers.append(layer)
    write_figures(args.out, "sparse_conv_backends", args, {
        "points": scene.num_points, "voxels": int(coords.shape[0]), "coarse_voxels": int(coarse),
        "spconv": importlib.import_module("spconv").__version__ if spconv_importable() else None, "layers": layers},
        show=render)


if __name__ == "__main__":
    main()
