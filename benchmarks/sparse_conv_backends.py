"""Sparse 3D convolution backends on one synthetic lidar sweep: xmcl's plain-PyTorch convs against spconv's CPU ops.

    python benchmarks/sparse_conv_backends.py [--config configs/distill_synthetic.yaml] [--points 30000]
        [--widths 32 64 128] [--repeats 7] [--threads 1] [--out runs/bench/sparse_conv_backends/default]

One built-in scene of ``--points`` lidar returns is voxelised as in pretraining (the config's voxel size, no
augmentation). For each width C, a C -> C 3x3x3 submanifold conv (xmcl ``SubmanifoldConv3d`` vs spconv
``SubMConv3d``) and a C -> C 2x2x2 stride-2 downsampling conv (xmcl ``StridedConv3d`` vs spconv ``SparseConv3d``,
kernel 2, stride 2) get the same weights and random input features. The layers' outputs and the gradients of the
input features and the weights (for the same random output gradient) are compared; then forward (no grad) and
forward + backward (``torch.autograd.grad`` of both) are timed with the neighbour maps already built, as a network
reuses them: xmcl's layer on a ``CoordinateMap`` whose maps are cached, spconv's autograd function
(``functional.indice_subm_conv`` / ``indice_conv``, what its layers call) on pairs made beforehand. Building the
maps is timed on its own: xmcl ``CoordinateMap(coords).neighbours()`` / ``.coarser()``, spconv
``ops.get_indice_pairs`` (what a layer runs when no ``indice_key`` cache holds its pairs). Times are medians over
``--repeats`` calls after one warm-up call, in ms. spconv weights are stored (C_out, kd, kh, kw, C_in) and correlate
(no kernel flip), so xmcl's (k^3, C_in, C_out) weight maps onto them by a reshape and a permute.
Without spconv (``import spconv.pytorch`` fails) only xmcl's convs are timed. Figures (times, the largest
differences, whether spconv was importable) go to OUT/figures.json, and their block of docs/results.md is printed.

spconv 2.3.8's backward (``ops.indice_conv_backward``) asks ``torch.cuda`` for the current stream before taking its
CPU branch, which never uses it; with a CPU-only torch that raises "Torch not compiled with CUDA enabled", so the
script replaces that lookup with a dummy stream when CUDA is unavailable (``patch_cpu_backward``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch
from figures import command_lines, options, parse_with_out, table, write_figures
from timing import repeat_seconds
from torch import Tensor, nn

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.preparation import load_scenes, scene_points, voxelize_scenes
from xmcl.nn.sparse_conv import CoordinateMap, SparseTensor, StridedConv3d, SubmanifoldConv3d, hash_coordinates

try:
    import spconv as spconv_package
    import spconv.pytorch as spconv
    from spconv.pytorch import functional as spconv_functional
    from spconv.pytorch import ops as spconv_ops
    SPCONV_ERROR = None
except ImportError as error:  # the project venv does not carry spconv
    spconv_package = spconv = spconv_functional = spconv_ops = None
    SPCONV_ERROR = f"{type(error).__name__}: {error}"


def patch_cpu_backward() -> None:
    """Let spconv's backward run under a CPU-only torch (see the module docstring)."""
    if not torch.cuda.is_available():
        spconv_ops.get_current_stream = lambda: 0


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1000 * statistics.median(repeat_seconds(fn, repeats))


def max_diff(a: Tensor, b: Tensor) -> float:
    """Max |a - b| relative to max |a|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


class SpconvGrid:
    """The voxels as spconv indices: ``(b, i, j, k)`` int32, shifted by an even amount per axis so that all are
    non-negative and the stride-2 parents match xmcl's ``floor(x / 2)``."""

    def __init__(self, coords: Tensor) -> None:
        self.shift = torch.div(coords[:, 1:].min(0).values, 2, rounding_mode="floor") * 2
        spatial = coords[:, 1:] - self.shift
        self.indices = torch.cat([coords[:, :1], spatial], dim=1).int()
        self.spatial_shape = (torch.div(spatial.max(0).values + 2, 2, rounding_mode="floor") * 2).tolist()

    def tensor(self, features: Tensor) -> "spconv.SparseConvTensor":
        return spconv.SparseConvTensor(features, self.indices, self.spatial_shape, batch_size=1)

    def order(self, out_indices: Tensor, keys: Tensor, stride: int) -> Tensor:
        """Row of each site of ``keys`` (xmcl's sorted keys at that stride) in spconv's output ``out_indices``."""
        coords = out_indices.long()
        coords[:, 1:] += torch.div(self.shift, stride, rounding_mode="floor")
        spconv_keys = hash_coordinates(coords)
        if spconv_keys.shape != keys.shape:
            raise RuntimeError(f"spconv has {spconv_keys.shape[0]} output sites, xmcl {keys.shape[0]}")
        rank = torch.argsort(spconv_keys)
        if not torch.equal(spconv_keys[rank], keys):
            raise RuntimeError("spconv and xmcl output sites differ")
        return rank


def spconv_pairs(conv: nn.Module, grid: SpconvGrid) -> tuple[Tensor, Tensor, Tensor]:
    """spconv's ``(output indices, index pairs, pairs per offset)`` of ``conv`` on the grid (what its forward builds
    when no ``indice_key`` cache holds them)."""
    return spconv_ops.get_indice_pairs(grid.indices, 1, grid.spatial_shape, conv.algo, conv.kernel_size, conv.stride,
                                       conv.padding, conv.dilation, conv.output_padding, conv.subm, conv.transposed)


def compare(kind: str, channels: int, coords: Tensor, repeats: int) -> dict:
    """``kind`` ("submanifold" or "strided") at ``channels`` -> ``channels``: the times (ms; lists of xmcl's, then
    spconv's when present) and the relative differences of out, grad_in, grad_w."""
    subm = kind == "submanifold"
    torch.manual_seed(0)
    ours = SubmanifoldConv3d(channels, channels) if subm else StridedConv3d(channels, channels)
    features = torch.randn(coords.shape[0], channels, requires_grad=True)
    cmap = CoordinateMap(coords)
    build_map = (lambda: CoordinateMap(coords).neighbours()) if subm else (lambda: CoordinateMap(coords).coarser())
    out_keys = cmap.keys if subm else cmap.coarser()[0].keys
    grad_out = torch.randn(out_keys.shape[0], channels)

    def ours_forward() -> Tensor:
        return ours(SparseTensor(features, cmap)).features

    maps = [median_ms(build_map, repeats)]
    with torch.no_grad():
        fwd = [median_ms(ours_forward, repeats)]
    fwd_bwd = [median_ms(lambda: torch.autograd.grad(ours_forward(), (features, ours.weight), grad_out), repeats)]
    if spconv is None:
        return {"map_ms": maps, "forward_ms": fwd, "forward_backward_ms": fwd_bwd}

    k = 3 if subm else 2
    theirs = (spconv.SubMConv3d(channels, channels, 3, bias=False) if subm
              else spconv.SparseConv3d(channels, channels, 2, stride=2, bias=False))
    with torch.no_grad():
        theirs.weight.copy_(ours.weight.reshape(k, k, k, channels, channels).permute(4, 0, 1, 2, 3))
    grid = SpconvGrid(coords)
    maps.append(median_ms(lambda: spconv_pairs(theirs, grid), repeats))
    out_indices, pairs, pair_counts = spconv_pairs(theirs, grid)
    conv_fn = spconv_functional.indice_subm_conv if subm else spconv_functional.indice_conv

    def theirs_forward() -> Tensor:  # what the layer runs once its pairs exist
        return conv_fn(features, theirs.weight, pairs, pair_counts, out_indices.shape[0], theirs.algo)

    rank = grid.order(out_indices, out_keys, 1 if subm else 2)
    their_grad_out = grad_out[torch.argsort(rank)]  # spconv's output rows
    out = ours_forward()
    grad_x, grad_w = torch.autograd.grad(out, (features, ours.weight), grad_out)
    their_out = theirs(grid.tensor(features)).features  # the layer itself, building its own pairs
    their_grad_x, their_grad_w = torch.autograd.grad(their_out, (features, theirs.weight), their_grad_out)
    diffs = (max_diff(out, their_out[rank]), max_diff(grad_x, their_grad_x),
             max_diff(grad_w, their_grad_w.permute(1, 2, 3, 4, 0).reshape(k ** 3, channels, channels)))
    with torch.no_grad():
        fwd.append(median_ms(theirs_forward, repeats))
    fwd_bwd.append(median_ms(lambda: torch.autograd.grad(theirs_forward(), (features, theirs.weight),
                                                         their_grad_out), repeats))
    return {"map_ms": maps, "forward_ms": fwd, "forward_backward_ms": fwd_bwd, "max_rel_diff": list(diffs)}


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
    header = ["layer", "width", "map ours"] + (["map spconv"] if with_spconv else []) + ["fwd+bwd ours"]
    header += ["fwd+bwd spconv", "spconv / ours", "max rel. diff"] if with_spconv else []
    rows = []
    for layer in f["layers"]:
        row = [layer["kind"], str(layer["channels"]), f"{layer['map_ms'][0]:.1f}"]
        if with_spconv:
            row.append(f"{layer['map_ms'][1]:.1f}")
        row.append(f"{layer['forward_backward_ms'][0]:.1f}")
        if with_spconv:
            row += [f"{layer['forward_backward_ms'][1]:.1f}", f"{layer['spconv_over_ours']:.2f}",
                    f"{max(layer['max_rel_diff']):.1e}"]
        rows.append(row)
    note = (f"spconv {f['spconv']}" if with_spconv else f"spconv not importable ({f['spconv_error']}): xmcl only")
    return f"{command_lines(d)}\n\n{f['voxels']:,} voxels; {note}; ms, medians:\n\n" + table(header, rows)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DistillConfig, args.config, ["data.pretrain_scenes=1", f"data.num_points={args.points}",
                                                   "data.num_cameras=1", "data.image_size=[16, 16]"])
    scene = load_scenes(cfg.data, "pretrain")[0]  # the lidar sweep does not depend on the cameras
    coords = voxelize_scenes([scene_points(scene, torch.device("cpu"))], cfg.voxel, None).coords
    coarse = CoordinateMap(coords).coarser()[0].num_sites
    if spconv is not None:
        patch_cpu_backward()
    layers = []
    for channels in args.widths:
        for kind in ("submanifold", "strided"):
            layer = {"kind": kind, "channels": channels, **compare(kind, channels, coords, args.repeats)}
            if len(layer["forward_backward_ms"]) == 2:
                layer["spconv_over_ours"] = layer["forward_backward_ms"][1] / layer["forward_backward_ms"][0]
            layers.append(layer)
    write_figures(args.out, "sparse_conv_backends", args, {
        "points": scene.num_points, "voxels": int(coords.shape[0]), "coarse_voxels": int(coarse),
        "spconv": None if spconv is None else spconv_package.__version__, "spconv_error": SPCONV_ERROR,
        "layers": layers}, show=render)


if __name__ == "__main__":
    main()
