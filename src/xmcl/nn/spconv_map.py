"""The sparse layers of ``xmcl.nn.sparse_conv`` on spconv's kernels (``pip install xmcl[spconv]``), and the choice
between the two backends.

``SpconvMap`` is a ``KernelMap``: the same three convolutions as ``CoordinateMap``, on the same weights, through
spconv's gather-GEMM-scatter ("native") autograd functions and its C++/CUDA kernel maps. Layer weights
``(k^3, C_in, C_out)`` in ``itertools.product`` offset order are spconv's ``(C_out, kd, kh, kw, C_in)`` after a
reshape and a permute (spconv correlates: no kernel flip). spconv wants non-negative int32 indices: level 0 is
shifted by ``floor(min / 2^8) * 2^8`` per axis, a multiple of every stride up to 2^8, so each stride-2 parent is
``floor(x / 2)`` as in ``CoordinateMap``. Coarser levels keep spconv's site order, which differs from
``CoordinateMap``'s sorted keys; level 0 keeps the input's order, so a network's output is the same function.

``sparse_backend``: "torch" (``CoordinateMap``), "spconv", or "auto": spconv on CUDA when it is importable, plain
PyTorch otherwise (on CPU spconv is faster per layer but its import costs seconds and it is an optional dependency).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Literal

import torch
from torch import Tensor

from xmcl.errors import ConfigError, DataError
from xmcl.nn.sparse_conv import CoordinateMap, KernelMap

SparseBackend = Literal["auto", "torch", "spconv"]
_ALIGN = 1 << 8  # level 0's shift is a multiple of this, so up to 8 stride-2 levels keep floor(x / 2) parents


def spconv_importable() -> bool:
    """True when the ``spconv`` package is installed (without importing it)."""
    return importlib.util.find_spec("spconv") is not None


def resolve_sparse_backend(backend: SparseBackend, device: torch.device) -> Literal["torch", "spconv"]:
    """The backend ``backend`` means on ``device``; "spconv" without the package installed is refused."""
    if backend == "torch":
        return "torch"
    if backend == "spconv":
        if not spconv_importable():
            raise ConfigError("voxel.sparse_backend: spconv is not installed in this environment "
                              "(pip install 'xmcl[spconv]'), or set it to 'auto' or 'torch'")
        return "spconv"
    if backend == "auto":
        return "spconv" if device.type == "cuda" and spconv_importable() else "torch"
    raise ConfigError(f"voxel.sparse_backend must be 'auto', 'torch' or 'spconv', got {backend!r}")


def level_zero_map(coords: Tensor, backend: Literal["torch", "spconv"]) -> KernelMap:
    """The finest level's map of the voxels ``coords`` (N, 4) ``(b, i, j, k)`` on ``backend``."""
    if backend == "spconv":
        return SpconvMap.from_coordinates(coords)
    return CoordinateMap(coords)


def _spconv() -> tuple[Any, Any, Any]:
    """spconv's ``ops``, ``functional`` and its native algorithm (imported on first use: it takes seconds)."""
    ops = importlib.import_module("spconv.pytorch.ops")
    functional = importlib.import_module("spconv.pytorch.functional")
    native = importlib.import_module("spconv.core").ConvAlgo.Native
    return ops, functional, native


def _krsc(weight: Tensor, kernel: int) -> Tensor:
    """A layer's ``(kernel^3, C_in, C_out)`` weight as spconv's ``(C_out, kd, kh, kw, C_in)`` (differentiable)."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    return weight.reshape(kernel, kernel, kernel, c_in, c_out).permute(4, 0, 1, 2, 3).contiguous()


class SpconvMap:
    """One level's sites as spconv indices, with its cached kernel maps (see the module docstring).

    ``indices`` (N, 4) int32 ``(b, i, j, k)``, non-negative; ``spatial_shape`` >= the largest ``i, j, k`` + 2 (spconv
    drops the stride-2 parents its output shape ``floor((shape - 2) / 2) + 1`` does not hold); ``shift`` (3,) int64
    = the voxel coordinates of index 0.
    """

    def __init__(self, indices: Tensor, spatial_shape: list[int], batch_size: int, shift: Tensor) -> None:
        self.indices = indices
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        self.shift = shift
        self._submanifold: tuple[Tensor, Tensor] | None = None
        self._coarser: tuple[SpconvMap, Tensor, Tensor] | None = None

    @classmethod
    def from_coordinates(cls, coords: Tensor) -> "SpconvMap":
        """Level 0 of the unique voxels ``coords`` (N, 4) ``(b, i, j, k)`` (any sign), in their order."""
        if coords.shape[0] == 0:
            raise DataError("cannot build a sparse level without voxels")
        spatial = coords[:, 1:].long()
        shift = torch.div(spatial.min(0).values, _ALIGN, rounding_mode="floor") * _ALIGN
        spatial = spatial - shift
        indices = torch.cat([coords[:, :1].long(), spatial], dim=1).int().contiguous()
        return cls(indices, (spatial.max(0).values + 2).tolist(), int(coords[:, 0].max()) + 1, shift)

    @property
    def num_sites(self) -> int:
        return int(self.indices.shape[0])

    @property
    def coords(self) -> Tensor:
        """(N, 4) int64 ``(b, i, j, k)`` of the sites in this level's voxel units, in spconv's order."""
        coords = self.indices.long()
        return torch.cat([coords[:, :1], coords[:, 1:] + self.shift], dim=1)

    def _pairs(self, kernel: int, stride: int, padding: int, subm: bool) -> tuple[Tensor, Tensor, Tensor]:
        ops, _, native = _spconv()
        return ops.get_indice_pairs(self.indices, self.batch_size, self.spatial_shape, native, [kernel] * 3,
                                    [stride] * 3, [padding] * 3, [1] * 3, [0] * 3, subm, False)

    def coarser(self) -> tuple["SpconvMap", Tensor, Tensor]:
        """(the stride-2 coarser level, the index pairs and the pairs per offset of the 2x2x2 kernel)."""
        if self._coarser is None:
            out_indices, pairs, counts = self._pairs(2, 2, 0, subm=False)
            shape = [size // 2 + 1 for size in self.spatial_shape]  # keeps the margin: shape >= max index + 2
            coarse = SpconvMap(out_indices, shape, self.batch_size, torch.div(self.shift, 2, rounding_mode="floor"))
            self._coarser = (coarse, pairs, counts)
        return self._coarser

    def submanifold_pairs(self) -> tuple[Tensor, Tensor]:
        """(the index pairs, the pairs per offset) of the 3x3x3 submanifold kernel."""
        if self._submanifold is None:
            _, pairs, counts = self._pairs(3, 1, 1, subm=True)
            self._submanifold = (pairs, counts)
        return self._submanifold

    def submanifold_conv(self, features: Tensor, weight: Tensor) -> Tensor:
        """As ``CoordinateMap.submanifold_conv``; ``weight`` (27, C_in, C_out)."""
        _, functional, native = _spconv()
        pairs, counts = self.submanifold_pairs()
        return functional.indice_subm_conv(features.contiguous(), _krsc(weight, 3), pairs, counts, self.num_sites,
                                           native)

    def strided_conv(self, features: Tensor, weight: Tensor) -> tuple[Tensor, "SpconvMap"]:
        """As ``CoordinateMap.strided_conv``; ``weight`` (8, C_in, C_out)."""
        _, functional, native = _spconv()
        coarse, pairs, counts = self.coarser()
        out = functional.indice_conv(features.contiguous(), _krsc(weight, 2), pairs, counts, coarse.num_sites,
                                     native)
        return out, coarse

    def transposed_conv(self, coarse_features: Tensor, coarse: KernelMap, weight: Tensor) -> Tensor:
        """As ``CoordinateMap.transposed_conv``; ``weight`` (8, C_in, C_out)."""
        _, functional, native = _spconv()
        level, pairs, counts = self.coarser()
        if level is not coarse:
            raise ValueError("TransposedConv3d: the input does not live on the coarser level of the target map")
        return functional.indice_inverse_conv(coarse_features.contiguous(), _krsc(weight, 2), pairs, counts,
                                              self.num_sites, native)

