"""The image-text retrieval protocol: R@1/5/10 both directions, median/mean rank, rSum, whole split or 1K folds.

The figures are those of the classic ``i2t``/``t2i`` functions of the field (VSE++, SCAN, VSE-infinity),
generalised from "5 consecutive captions per image" to any ``caption_image`` mapping:

- similarity ``S[n, m]`` = dot product of image ``n`` and caption ``m`` (embeddings are L2-normalised by the caller);
- candidates are ordered by score descending and, on exactly equal scores, by index descending (the order of
  the classic ``np.argsort(d)[::-1]``: an ascending sort that keeps equal scores in index order, reversed), so the
  0-based rank of candidate ``j`` in a query's list is ``#{score > s_j} + #{score == s_j and index > j}``;
- image-to-text: an image's rank is the best (smallest) rank among its own captions;
  text-to-image: a caption's rank is the rank of its image;
- ``R@K = 100 * mean(rank < K)``, ``medr = floor(median(rank)) + 1``, ``meanr = mean(rank) + 1``,
  ``rSum`` = the six recalls added.

The classic loop equals this module on every input, ties included, when its ascending argsort keeps equal scores
in index order: numpy's ``kind="stable"``, and the insertion sort that numpy's introsort used on short rows. Its
default ``np.argsort`` is unstable, so on exact ties the classic code's order is whatever the sort algorithm leaves
(numpy 2's SIMD sorts on x86 reorder equal scores); away from exact ties the two agree whatever the sort.

Protocols: ``"all"`` ranks against the whole split (Flickr 1K, COCO 5K); ``"fold5"`` (COCO 1K) cuts the images into
5 consecutive folds, ranks each fold against its own images and their captions only, and reports the mean of every
metric over the folds (the per-fold figures are kept in ``Metrics.folds``).

Ranks come from comparisons, not sorts: the similarity is one GEMM, then tiles of it are compared with each
query's target score and counted (one comparison per entry and direction), so the protocol runs near GEMM speed
and the temporaries stay at ``chunk_size`` entries. Work is in float32 on the device of the inputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from xmcl.errors import ConfigError, DataError
from xmcl.runtime.files import atomic_write_text

ArrayLike = Union[np.ndarray, torch.Tensor]

PROTOCOLS = ("all", "fold5")
RECALL_KS = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1 << 20
"""Similarity entries compared at a time (4 MiB of float32). Each tile also re-reads the rows of the queries whose
target falls inside it (about ``queries x tile`` entries in all), a cost that grows with the tile: on 1K folds,
1 << 22 made that pass as long as the count itself; 1 << 20 (measured with ``benchmarks/eval_speed.py``) halves the
protocol's ranking time and keeps the tiles inside the caches."""

_EXACT_COUNT_LIMIT = 1 << 24
"""Counts are summed as float32 0/1 values, exact while they stay below 2**24."""


@dataclass(frozen=True)
class Metrics:
    """Recall (percent) at 1/5/10, median and mean rank (1-based) for both directions, and rSum.

    ``images``: how many images were ranked (the split, or one fold). For ``fold5`` every field is the mean over
    the folds and ``folds`` holds each fold's own figures.
    """

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    i2t_medr: float
    i2t_meanr: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    t2i_medr: float
    t2i_meanr: float
    rsum: float
    images: int = 0
    folds: tuple["Metrics", ...] = ()

    def as_dict(self) -> dict:
        """The figures by name; ``folds`` (a list of such dicts) only when there are folds."""
        out: dict = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "folds"}
        if self.folds:
            out["folds"] = [fold.as_dict() for fold in self.folds]
        return out

    @classmethod
    def mean_of(cls, folds: Sequence["Metrics"]) -> "Metrics":
        """Every figure averaged over ``folds`` (as the classic 1K protocol reports), keeping the folds."""
        names = [f.name for f in fields(cls) if f.name != "folds"]
        means = {name: float(np.mean([getattr(fold, name) for fold in folds])) for name in names}
        means["images"] = int(round(means["images"]))
        return cls(**means, folds=tuple(folds))


@dataclass(frozen=True)
class Ranks:
    """0-based ranks: ``i2t[n]`` of image ``n``'s best caption, ``t2i[m]`` of caption ``m``'s image."""

    i2t: np.ndarray
    t2i: np.ndarray

    def metrics(self) -> Metrics:
        i2t = _direction_figures(self.i2t)
        t2i = _direction_figures(self.t2i)
        rsum = sum(i2t[:3]) + sum(t2i[:3])
        return Metrics(*i2t, *t2i, rsum=rsum, images=len(self.i2t))


def _direction_figures(ranks: np.ndarray) -> tuple[float, ...]:
    """R@1, R@5, R@10, medr, meanr of one direction, as the classic code computes them."""
    ranks = np.asarray(ranks)
    recalls = [100.0 * float(np.mean(ranks < k)) for k in RECALL_KS]
    return (*recalls, float(math.floor(np.median(ranks)) + 1), float(np.mean(ranks) + 1))


# ------------------------------------------------------------------------------------------ inputs
def _as_matrix(values: ArrayLike, what: str, device: torch.device | str | None) -> torch.Tensor:
    """A finite, non-empty 2-D float32 tensor on ``device`` (default: where ``values`` already is)."""
    if isinstance(values, torch.Tensor):
        dtype, real = values.dtype, not (values.is_complex() or values.dtype == torch.bool)
        tensor = values.detach()
    else:
        array = np.asarray(values)
        dtype, real = array.dtype, array.dtype.kind in "iuf"
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) if real else None
    if not real:
        raise DataError(f"{what} must hold real numbers, got dtype {dtype}")
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise DataError(f"{what} must be a non-empty 2-D matrix, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device=device if device is not None else tensor.device, dtype=torch.float32)
    if not math.isfinite(float(tensor.sum())):  # one fused pass; NaN and inf propagate, the search runs on failure
        bad = torch.nonzero(~torch.isfinite(tensor))
        if bad.numel():
            raise DataError(f"{what}: non-finite value (NaN or inf) at {tuple(bad[0].tolist())}")
    return tensor


def _caption_index(caption_image: ArrayLike, num_images: int, num_captions: int,
                   device: torch.device) -> torch.Tensor:
    """``caption_image`` checked (one entry per caption, each in [0, N), every image described) as int64."""
    index = caption_image.detach().cpu().numpy() if isinstance(caption_image, torch.Tensor) else np.asarray(caption_image)
    if index.shape != (num_captions,):
        raise DataError(f"caption_image must have one entry per caption ({num_captions}), got shape {index.shape}")
    if not np.issubdtype(index.dtype, np.integer):
        raise DataError(f"caption_image must hold integer image indices, got dtype {index.dtype}")
    bad = np.flatnonzero((index < 0) | (index >= num_images))
    if bad.size:
        raise DataError(f"caption_image[{bad[0]}] = {index[bad[0]]} is not an image index (there are {num_images} images)")
    counts = np.bincount(index, minlength=num_images)
    if (counts == 0).any():
        raise DataError(f"image {int(np.flatnonzero(counts == 0)[0])} has no caption; every image needs at least one")
    if max(num_images, num_captions) >= _EXACT_COUNT_LIMIT:
        raise DataError(f"{num_images} images x {num_captions} captions: at most {_EXACT_COUNT_LIMIT - 1} of each")
    return torch.from_numpy(index.astype(np.int64)).to(device)


def _check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    if isinstance(protocols, str):
        protocols = (protocols,)
    if not protocols:
        raise ConfigError(f"no evaluation protocol given (choose from {', '.join(PROTOCOLS)})")
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown evaluation protocol '{name}' (choose from {', '.join(PROTOCOLS)})")
    return tuple(dict.fromkeys(protocols))


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------- ranking
def similarity_matrix(image_emb: ArrayLike, text_emb: ArrayLike,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``S = image_emb @ text_emb.T`` (N x M, float32) in one GEMM on ``device`` (default: the images' device)."""
    images = _as_matrix(image_emb, "image embeddings", device)
    texts = _as_matrix(text_emb, "caption embeddings", images.device)
    if images.shape[1] != texts.shape[1]:
        raise DataError(f"image embeddings have dimension {images.shape[1]} but caption embeddings {texts.shape[1]}")
    return images @ texts.T


def _captions_by_image(caption_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """(N, K) caption indices of each image, ascending; rows shorter than K repeat their first caption."""
    order = torch.argsort(caption_image, stable=True)
    counts = torch.bincount(caption_image, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    owner = caption_image[order]
    slot = torch.arange(order.numel(), device=order.device) - starts[owner]
    table = order[starts].unsqueeze(1).repeat(1, int(counts.max()))
    table[owner, slot] = order
    return table


def _ties_after(scores: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row ``r``: ``#{j > index[r] : scores[r, j] == value[r]}`` (``value``, ``index`` shaped (k, 1))."""
    position = torch.arange(scores.shape[1], device=scores.device)
    return ((scores == value) & (position > index)).sum(1)


def _count_ahead(scores: torch.Tensor, target: torch.Tensor, target_index: torch.Tensor, tile: int) -> torch.Tensor:
    """Per query row ``q`` of ``scores`` (Q x L, any strides): how many candidates sort ahead of its target, i.e.
    ``#{j : scores[q, j] > target[q]} + #{j > target_index[q] : scores[q, j] == target[q]}``.

    One comparison per entry, in tiles of ``tile`` columns: a tile wholly after the target's column counts
    ``scores > nextafter(target, -inf)`` (that is ``>=``), a tile at or before it counts ``>``; the few equal scores
    after the target inside the target's own tile are then counted on that tile's queries only. Where flushed
    denormals make ``nextafter`` useless (a zero or tiny target), the query counts ``>`` everywhere and its ties
    after its tile are counted on its whole row.
    """
    num_queries, length = scores.shape
    before = torch.nextafter(target, torch.full_like(target, -math.inf))
    exact = before < target
    before = torch.where(exact, before, target)
    tile_end = target_index // tile * tile + tile
    order = torch.argsort(target_index // tile)
    ends = torch.bincount(target_index // tile, minlength=-(-length // tile)).cumsum(0).tolist()
    counts = torch.zeros(num_queries, dtype=scores.dtype, device=scores.device)
    if scores.stride(0) < scores.stride(1):  # a transposed view: keep the comparisons in memory order
        work = torch.empty(tile, num_queries, dtype=scores.dtype, device=scores.device).T
    else:
        work = torch.empty(num_queries, tile, dtype=scores.dtype, device=scores.device)
    for k, start in enumerate(range(0, length, tile)):
        block = scores[:, start:start + tile]
        threshold = torch.where(target_index < start, before, target).unsqueeze(1)
        counts += torch.gt(block, threshold, out=work[:, : block.shape[1]]).sum(1)
        mixed = order[(ends[k - 1] if k else 0):ends[k]]
        if mixed.numel():
            counts[mixed] += _ties_after(block[mixed], target[mixed, None], (target_index[mixed] - start)[:, None])
    flushed = torch.nonzero(~exact).flatten()
    rows = max(1, tile * num_queries // length)
    for first in range(0, flushed.numel(), rows):
        q = flushed[first:first + rows]
        counts[q] += _ties_after(scores[q], target[q, None], tile_end[q, None] - 1)
    return counts.long()


def _ranks(sim: torch.Tensor, caption_image: torch.Tensor, chunk_size: int) -> Ranks:
    """Ranks of a validated float32 similarity (see the module docstring): one comparison per entry and direction.

    Image-to-text: the image's best caption ``j*`` (highest score, then largest index) holds its best rank, the
    number of captions ahead of ``(S[n, j*], j*)``. Text-to-image: the number of images ahead of
    ``(S[image(m), m], image(m))`` in column ``m``. Tiles hold about ``chunk_size`` entries.
    """
    num_images, num_captions = sim.shape
    own_captions = _captions_by_image(caption_image, num_images)
    positive = sim.gather(1, own_captions)
    best = positive.amax(1)
    best_index = torch.where(positive == best[:, None], own_captions, -1).amax(1)
    target = sim[caption_image, torch.arange(num_captions, device=sim.device)]
    i2t = _count_ahead(sim, best, best_index, max(1, chunk_size // num_images))
    t2i = _count_ahead(sim.T, target, caption_image, max(1, chunk_size // num_captions))
    return Ranks(i2t=i2t.cpu().numpy(), t2i=t2i.cpu().numpy())


def _fold_ranks(sim: torch.Tensor, caption_image: torch.Tensor, folds: int, chunk_size: int) -> list[Ranks]:
    """Ranks within each of ``folds`` consecutive image folds, against that fold's images and captions only."""
    num_images = sim.shape[0]
    if num_images % folds:
        raise DataError(f"protocol fold{folds} needs a number of images divisible by {folds}, got {num_images}")
    size = num_images // folds
    out = []
    for fold in range(folds):
        low, high = fold * size, (fold + 1) * size
        cols = torch.nonzero((caption_image >= low) & (caption_image < high)).flatten()
        if int(cols[-1] - cols[0]) + 1 == cols.numel():  # captions stored image by image: a view, no copy
            block = sim[low:high, int(cols[0]):int(cols[-1]) + 1]
        else:
            block = sim[low:high].index_select(1, cols)
        out.append(_ranks(block, caption_image[cols] - low, chunk_size))
    return out


def retrieval_ranks(sim: ArrayLike, caption_image: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Ranks:
    """0-based ranks of both directions over the whole similarity matrix ``sim`` (N images x M captions)."""
    _check_chunk_size(chunk_size)
    sim = _as_matrix(sim, "similarity matrix", None)
    return _ranks(sim, _caption_index(caption_image, *sim.shape, sim.device), chunk_size)


def fold_ranks(sim: ArrayLike, caption_image: ArrayLike, folds: int = 5, *,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Ranks]:
    """Ranks of each fold of the 1K protocol (fold-local indices: images and captions of the fold, in order)."""
    _check_chunk_size(chunk_size)
    sim = _as_matrix(sim, "similarity matrix", None)
    return _fold_ranks(sim, _caption_index(caption_image, *sim.shape, sim.device), folds, chunk_size)


def _evaluate(sim: torch.Tensor, caption_image: ArrayLike, protocols: tuple[str, ...],
              chunk_size: int) -> dict[str, Metrics]:
    index = _caption_index(caption_image, *sim.shape, sim.device)
    results = {}
    for protocol in protocols:
        if protocol == "all":
            results[protocol] = _ranks(sim, index, chunk_size).metrics()
        else:
            folds = int(protocol.removeprefix("fold"))
            results[protocol] = Metrics.mean_of([r.metrics() for r in _fold_ranks(sim, index, folds, chunk_size)])
    return results


def evaluate_similarity(sim: ArrayLike, caption_image: ArrayLike, protocols: Sequence[str] = ("all",), *,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Metrics]:
    """Metrics of each protocol (``"all"``, ``"fold5"``) from a precomputed N x M similarity matrix."""
    protocols = _check_protocols(protocols)
    _check_chunk_size(chunk_size)
    return _evaluate(_as_matrix(sim, "similarity matrix", None), caption_image, protocols, chunk_size)


def evaluate_embeddings(image_emb: ArrayLike, text_emb: ArrayLike, caption_image: ArrayLike,
                        protocols: Sequence[str] = ("all",), *, device: torch.device | str | None = None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Metrics]:
    """Metrics of each protocol from L2-normalised image (N x d) and caption (M x d) embeddings.

    The similarity is computed once and every protocol (fold blocks included) reads from it.
    """
    protocols = _check_protocols(protocols)
    _check_chunk_size(chunk_size)
    return _evaluate(similarity_matrix(image_emb, text_emb, device), caption_image, protocols, chunk_size)


# ----------------------------------------------------------------------------------------- reports
_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
            "t2i_meanr", "rsum")
FOLD_IMAGES = 1000  # the images of one fold of the classic COCO 1K protocol


def protocol_warnings(results: dict[str, Metrics]) -> list[str]:
    """Warnings for figures that are not what their protocol's name promises: ``fold5`` on folds of fewer than
    ``FOLD_IMAGES`` images (recall on small folds is much higher than the published 1K figures)."""
    warnings = []
    for name, metrics in results.items():
        if metrics.folds:
            size = metrics.folds[0].images
            if size < FOLD_IMAGES:
                warnings.append(f"{name}: folds of {size} images, not the {FOLD_IMAGES:,} of the COCO 1K protocol; "
                                f"these figures are not comparable to published 1K results (use --protocol all)")
    return warnings


def format_table(results: dict[str, Metrics], show_folds: bool = True, label: str = "run") -> str:
    """A fixed-width table: one row per result (``label`` heads their names: a run, or a protocol) and per fold
    under it; R@1/5/10, median and mean rank both ways, and rSum."""
    rows = []
    for name, metrics in results.items():
        rows.append((name, metrics))
        if show_folds:
            rows.extend((f"  fold {i + 1}", fold) for i, fold in enumerate(metrics.folds))
    width = max([len(label)] + [len(name) for name, _ in rows])
    direction = f"{'R@1':>6} {'R@5':>7} {'R@10':>7} {'medr':>6} {'meanr':>7}"
    lines = [
        f"{'':{width}}  {'image-to-text':^36}  {'text-to-image':^36}",
        f"{label:{width}}  {direction}  {direction}  {'rSum':>7}",
    ]
    for name, metrics in rows:
        v = [getattr(metrics, column) for column in _COLUMNS]
        lines.append(f"{name:{width}}  {v[0]:6.2f} {v[1]:7.2f} {v[2]:7.2f} {v[3]:6.1f} {v[4]:7.2f}  "
                     f"{v[5]:6.2f} {v[6]:7.2f} {v[7]:7.2f} {v[8]:6.1f} {v[9]:7.2f}  {v[10]:7.2f}")
    return "\n".join(lines)


def save_json(results: dict[str, Metrics], path: Path) -> Path:
    """Write ``{run: metrics}`` as JSON (folds included) to ``path`` atomically, creating its folder."""
    path = Path(path)
    atomic_write_text(path, json.dumps({name: metrics.as_dict() for name, metrics in results.items()}, indent=2) + "\n")
    return path
