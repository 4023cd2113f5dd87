"""The spconv backend against the plain-PyTorch one: each convolution, a whole U-Net's forward and gradients, a
pretraining step; and which backend a setting means."""

from pathlib import Path

import pytest
import torch
from helpers import distill_config

from xmcl.distill.res16unet import Res16UNet
from xmcl.distill.voxel_net import VoxelUNet, voxelize_clouds
from xmcl.errors import ConfigError
from xmcl.nn import spconv_map
from xmcl.nn.sparse_conv import (
    CoordinateMap,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    hash_coordinates,
)
from xmcl.nn.spconv_map import SpconvMap, resolve_sparse_backend
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.distill_trainer import pretrain_distill

pytest.importorskip("spconv.pytorch")


def _clouds(seed: int, sizes: tuple[int, ...] = (900, 700)) -> list[torch.Tensor]:
    """Clouds of x, y, z, intensity around an odd, negative offset (parents then differ from a shift by 2)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randn(n, 3, generator=gen) * 1.5 - 0.73, torch.rand(n, 1, generator=gen)], dim=1)
            for n in sizes]


def _grads(layer_out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Gradients of ``sum(out * g)`` for a fixed random ``g`` with respect to ``inputs``."""
    g = torch.randn(layer_out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad((layer_out * g).sum(), inputs))


def test_each_convolution_and_its_gradients_equal_the_torch_backend() -> None:
    batch = voxelize_clouds(_clouds(0), voxel_size=0.2)
    assert int(batch.coords[:, 1:].min()) < 0
    torch.manual_seed(0)
    subm, down, up = SubmanifoldConv3d(1, 8), StridedConv3d(8, 12), TransposedConv3d(12, 5)
    subm, down, up = subm.double(), down.double(), up.double()
    features = torch.randn(batch.coords.shape[0], 1, dtype=torch.float64, requires_grad=True)
    results = []
    for cmap in (CoordinateMap(batch.coords), SpconvMap.from_coordinates(batch.coords)):
        x = subm(SparseTensor(features, cmap))
        coarse = down(x)
        out = up(coarse, x.cmap)
        params = [features, subm.weight, down.weight, up.weight]
        coarse_coords = coarse.cmap.coords
        by_site = torch.argsort(hash_coordinates(coarse_coords))  # the torch backend's order: sorted keys
        results.append((x.features, coarse_coords[by_site], coarse.features[by_site], out.features,
                         _grads(out.features, params, 1)))
    (x_t, sites_t, down_t, out_t, grads_t), (x_s, sites_s, down_s, out_s, grads_s) = results
    torch.testing.assert_close(x_s, x_t, rtol=1e-12, atol=1e-12)
    assert torch.equal(sites_s, sites_t)
    torch.testing.assert_close(down_s, down_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s, out_t, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_s, grads_t):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", [
    lambda backend: VoxelUNet(1, widths=(8, 16, 24), out_dim=6, sparse_backend=backend),
    lambda backend: Res16UNet(1, planes=(8, 8, 16, 16, 16, 8, 8, 8), layers=(1,) * 8, init_dim=8, out_dim=6,
                              sparse_backend=backend),
], ids=["unet", "res16unet"])
def test_a_network_trains_the_same_on_both_backends(build) -> None:
    batch = voxelize_clouds(_clouds(2), voxel_size=0.15)
    batch.features = batch.features.double()  # float64: the two differ by rounding alone, so tolerances stay tight
    torch.manual_seed(3)
    torch_net = build("torch").double()
    spconv_net = build("spconv").double()
    spconv_net.load_state_dict(torch_net.state_dict())
    outs, grads = [], []
    for net in (torch_net, spconv_net):
        out = net(batch)
        outs.append(out)
        grads.append(_grads(out, list(net.parameters()), 4))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for key, want in torch_net.state_dict().items():  # BatchNorm's running statistics too
        torch.testing.assert_close(spconv_net.state_dict()[key], want, rtol=1e-10, atol=1e-12)


def test_what_each_setting_means(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_sparse_backend("auto", cpu) == "torch"
    assert resolve_sparse_backend("auto", cuda) == "spconv"
    assert resolve_sparse_backend("torch", cuda) == "torch"
    assert resolve_sparse_backend("spconv", cpu) == "spconv"
    monkeypatch.setattr(spconv_map, "spconv_importable", lambda: False)
    assert resolve_sparse_backend("auto", cuda) == "torch"
    with pytest.raises(ConfigError, match=r"voxel.sparse_backend: spconv is not installed"):
        resolve_sparse_backend("spconv", cpu)
    with pytest.raises(ConfigError, match=r"'auto', 'torch' or 'spconv', got 'cuda'"):
        resolve_sparse_backend("cuda", cpu)  # type: ignore[arg-type]


def test_pretraining_on_spconv_takes_the_steps_of_the_torch_backend(tmp_path: Path) -> None:
    weights = {}
    for backend in ("torch", "spconv"):
        cfg = distill_config("optim.steps=2", f"superpixels.cache_dir={tmp_path / 'sp'}",
                             f"voxel.sparse_backend={backend}")
        weights[backend] = read_checkpoint(pretrain_distill(cfg, tmp_path / backend))["voxel_net"]
    assert weights["torch"].keys() == weights["spconv"].keys()
    for key, want in weights["torch"].items():
        torch.testing.assert_close(weights["spconv"][key], want, rtol=1e-3, atol=1e-4)
