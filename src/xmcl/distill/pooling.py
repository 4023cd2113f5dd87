"""Superpixel pooling as one sparse matrix product per side (as in SLidR).

For the kept superpixels ``k = 0..K-1`` (those with at least one projected point), the pooled features are

    f_k = mean of point_features[point] over the (point, pixel) pairs whose pixel lies in superpixel k,
    g_k = mean of pixel_features[pixel] over all pixels of superpixel k,

computed as ``A_points @ point_features`` and ``A_pixels @ pixel_features`` with sparse (K x P) and (K x M)
averaging matrices (row k holds ``1 / count_k`` at its members). Superpixels without any projected point are dropped
on both sides. Superpixel ids are global over a batch of images (see ``global_superpixel_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xmcl.errors import DataError


def global_superpixel_ids(maps: list[Tensor]) -> tuple[Tensor, list[int]]:
    """Flatten per-image superpixel maps (H_b x W_b, ids >= 0) into one id space.

    Returns the concatenated flat ids (image b's ids shifted by ``offsets[b]`` = number of ids of images before b,
    counted as ``max id + 1``) and the offsets.
    """
    flat, offsets, total = [], [], 0
    for b, sp in enumerate(maps):
        if sp.numel() == 0 or int(sp.min()) < 0:
            raise DataError(f"superpixel map of image {b} is empty or has negative ids")
        offsets.append(total)
        flat.append(sp.reshape(-1).long() + total)
        total += int(sp.max()) + 1
    return torch.cat(flat), offsets


def averaging_matrix(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> Tensor:
    """Sparse (num_rows x num_cols) matrix with ``1 / (entries in row r)`` at each ``(rows[i], cols[i])``."""
    counts = torch.bincount(rows, minlength=num_rows).to(torch.float32)
    values = 1.0 / counts[rows]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (num_rows, num_cols),
                                   check_invariants=False).coalesce()


@dataclass
class SuperpixelPooling:
    """The two averaging matrices of one batch and the global ids of the K kept superpixels."""

    point_matrix: Tensor
    pixel_matrix: Tensor
    superpixel_ids: Tensor

    @property
    def num_superpixels(self) -> int:
        return int(self.superpixel_ids.shape[0])

    def pool_points(self, point_features: Tensor) -> Tensor:
        """(P, d) -> (K, d)."""
        return torch.sparse.mm(self.point_matrix.to(point_features.dtype), point_features)

    def pool_pixels(self, pixel_features: Tensor) -> Tensor:
        """(M, e) -> (K, e); ``pixel_features`` rows follow the flat order of ``global_superpixel_ids``."""
        return torch.sparse.mm(self.pixel_matrix.to(pixel_features.dtype), pixel_features)


def build_superpixel_pooling(pair_point: Tensor, pair_pixel: Tensor, num_points: int,
                             pixel_superpixel: Tensor) -> SuperpixelPooling:
    """Averaging matrices from the (point index, flat pixel index) pairs of the projected points.

    ``pixel_superpixel`` (M,) is the global superpixel id of each flat pixel of the batch's images.
    """
    if pair_point.shape != pair_pixel.shape or pair_point.dim() != 1:
        raise DataError(f"pairs: point and pixel indices must be 1-D of equal length, got {tuple(pair_point.shape)} "
                        f"and {tuple(pair_pixel.shape)}")
    if pair_point.numel() == 0:
        raise DataError("no point projects into any image of the batch: nothing to pool")
    num_pixels = int(pixel_superpixel.shape[0])
    if int(pair_pixel.min()) < 0 or int(pair_pixel.max()) >= num_pixels:
        raise DataError(f"pairs: pixel index out of range [0, {num_pixels})")
    if int(pair_point.min()) < 0 or int(pair_point.max()) >= num_points:
        raise DataError(f"pairs: point index out of range [0, {num_points})")
    pair_superpixel = pixel_superpixel[pair_pixel]
    kept = torch.unique(pair_superpixel)
    point_rows = torch.searchsorted(kept, pair_superpixel)
    pixel_rows = torch.searchsorted(kept, pixel_superpixel).clamp_(max=kept.shape[0] - 1)
    in_kept = kept[pixel_rows] == pixel_superpixel
    pixel_cols = torch.nonzero(in_kept).squeeze(1)
    k = int(kept.shape[0])
    return SuperpixelPooling(
        point_matrix=averaging_matrix(point_rows, pair_point.long(), k, num_points),
        pixel_matrix=averaging_matrix(pixel_rows[in_kept], pixel_cols, k, num_pixels),
        superpixel_ids=kept,
    )


def _bilinear_taps(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each output index of a bilinear resize ``size_in -> size_out`` (``align_corners=False``, as
    ``F.interpolate``): the two source indices and their weights. ``src = max(0, (o + 0.5) * in / out - 0.5)``,
    ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, weights ``1 - (src - i0)`` and ``src - i0``."""
    src = ((torch.arange(size_out, device=device, dtype=torch.float64) + 0.5) * size_in / size_out - 0.5).clamp(min=0)
    i0 = torch.floor(src).long().clamp(max=size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def upsampled_superpixel_means(feature_map: Tensor, superpixel_map: Tensor, num_superpixels: int) -> Tensor:
    """(S, C) mean over each superpixel's pixels of ``feature_map`` (C, h, w) bilinearly upsampled to the (H, W) of
    ``superpixel_map``, without forming the (C, H, W) upsampled map.

    Upsampling is linear, ``up = U m`` with U holding the 4 bilinear taps of each pixel, so the means are
    ``(A U) m`` with A the (S x H*W) averaging matrix: A U is (S x h*w), accumulated from the taps of every pixel.
    Equals averaging ``F.interpolate(m, (H, W), mode="bilinear", align_corners=False)``; an id absent from the map
    gets a zero row.
    """
    channels, h, w = feature_map.shape
    height, width = superpixel_map.shape
    device = feature_map.device
    r0, r1, wr0, wr1 = _bilinear_taps(h, height, device)
    c0, c1, wc0, wc1 = _bilinear_taps(w, width, device)
    sp = superpixel_map.long().to(device)
    counts = torch.bincount(sp.reshape(-1), minlength=num_superpixels).double().clamp(min=1)
    weights = torch.zeros(num_superpixels * h * w, dtype=torch.float64, device=device)
    for rows, row_w in ((r0, wr0), (r1, wr1)):
        for cols, col_w in ((c0, wc0), (c1, wc1)):
            flat = sp * (h * w) + rows[:, None] * w + cols[None, :]
            weights.index_add_(0, flat.reshape(-1), (row_w[:, None] * col_w[None, :]).reshape(-1))
    weights = weights.reshape(num_superpixels, h * w) / counts[:, None]
    return (weights.to(feature_map.dtype) @ feature_map.reshape(channels, h * w).T)
