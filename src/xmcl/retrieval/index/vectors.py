"""The FAISS index over a collection's unit embeddings (inner product = cosine): chosen, tuned, built, measured.

Choice (``choose_index``), after autofaiss' rule of size first, then memory: exact search (``IndexFlatIP``) below
``EXACT_MAX`` vectors, or when asked; HNSW (32 links) up to ``HNSW_MAX`` vectors when it fits the memory budget
(the fastest queries, but its build grows fastest); beyond, an inverted file with ``nlist`` = the power of two
nearest ``2 sqrt(n)`` lists holding the vectors as they are (``IVF,Flat``), as 8-bit scalars (``IVF,SQ8``, 4x
smaller) or as product codes (``IVF,PQ``, the smallest that fits), the first that fits the budget.

Tuning (``tune``): the search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW) is raised through powers of
two until recall@k against exact search reaches the target on a held-out sample of the collection's own vectors
(kept out of the IVF training sample; each query's own id is left out of both result lists). The recall reached
is reported whether or not it meets the target (PQ may not).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from xmcl.errors import CheckpointError, ConfigError
from xmcl.runtime.files import atomic_write_bytes

EXACT_MAX = 10_000
HNSW_MAX = 100_000
HNSW_LINKS = 32
INDEX_TYPES = ("auto", "exact", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq")
PARAMETER = {"hnsw": "efSearch", "ivf_flat": "nprobe", "ivf_sq8": "nprobe", "ivf_pq": "nprobe"}


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index: ``kind`` (one of ``INDEX_TYPES`` but auto), its ``nlist`` (IVF) and ``pq_bytes`` (PQ)."""

    kind: str
    nlist: int = 0
    pq_bytes: int = 0

    def factory(self, dim: int) -> str:
        """The ``faiss.index_factory`` string of the plan."""
        return {"exact": "Flat", "hnsw": f"HNSW{HNSW_LINKS},Flat", "ivf_flat": f"IVF{self.nlist},Flat",
                "ivf_sq8": f"IVF{self.nlist},SQ8", "ivf_pq": f"IVF{self.nlist},PQ{self.pq_bytes}x8"}[self.kind]


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``2 sqrt(n)``, at least 16, at most ``n / 39``
    (FAISS wants 39 training points per centroid)."""
    nearest = 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    return int(max(16, min(nearest, 2 ** int(math.log2(max(n // 39, 16))))))


def index_bytes(plan: IndexPlan, n: int, dim: int) -> int:
    """Estimated memory of the plan's index over ``n`` vectors of ``dim`` (vectors, ids, links, centroids)."""
    centroids = plan.nlist * dim * 4
    per_vector = {"exact": 4 * dim, "hnsw": 4 * dim + 2 * HNSW_LINKS * 4 * 1.05, "ivf_flat": 4 * dim + 8,
                  "ivf_sq8": dim + 8, "ivf_pq": plan.pq_bytes + 8}[plan.kind]
    extra = {"ivf_sq8": 2 * dim * 4, "ivf_pq": 256 * dim * 4}.get(plan.kind, 0)
    return int(n * per_vector + centroids + extra)


def _pq_bytes(dim: int, budget: int, n: int, nlist: int) -> int:
    """The largest code size (a divisor of ``dim``, at most 64 bytes) whose IVF-PQ index fits ``budget``."""
    options = [m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and m <= max(dim // 4, 1)]
    for m in options:
        if index_bytes(IndexPlan("ivf_pq", nlist, m), n, dim) <= budget:
            return m
    return options[-1]


def parse_size(text: str) -> int:
    """Bytes from ``"8G"``, ``"512MB"``, ``"1.5GiB"``, ``"2000000"`` (K/M/G/T are powers of 1024)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(cleaned[-1:], 1)
    number = cleaned[:-1] if scale > 1 else cleaned
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"memory budget {text!r} is not a size such as 8G, 512M or 2000000") from None
    if value <= 0:
        raise ConfigError(f"memory budget must be positive, got {text!r}")
    return int(value * scale)


def default_memory_budget() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_index(n: int, dim: int, memory_budget: int | None = None, kind: str = "auto") -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` under ``memory_budget`` bytes (module docstring); ``kind`` forces one."""
    if kind not in INDEX_TYPES:
        raise ConfigError(f"index type {kind!r} is not one of {', '.join(INDEX_TYPES)}")
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    nlist = ivf_lists(n)
    if kind == "auto":
        if n < EXACT_MAX:
            return IndexPlan("exact")
        if n <= HNSW_MAX and index_bytes(IndexPlan("hnsw"), n, dim) <= budget:
            return IndexPlan("hnsw")
        for candidate in ("ivf_flat", "ivf_sq8"):
            if index_bytes(IndexPlan(candidate, nlist), n, dim) <= budget:
                return IndexPlan(candidate, nlist)
        kind = "ivf_pq"
    if kind in ("exact", "hnsw"):
        return IndexPlan(kind)
    if n < 39 * nlist:
        raise ConfigError(f"an {kind} index of {nlist} lists needs at least {39 * nlist} vectors to train on, and "
                          f"there are {n}; use --index-type exact or auto")
    if kind == "ivf_pq":
        return IndexPlan(kind, nlist, _pq_bytes(dim, budget, n, nlist))
    return IndexPlan(kind, nlist)


def memory_table(dim: int, sizes: tuple[int, ...] = (1_000_000, 100_000_000)) -> dict[str, dict[str, int]]:
    """Estimated bytes of each index kind at each collection size (for "which machine do I need")."""
    table = {}
    for n in sizes:
        nlist = ivf_lists(n)
        table[str(n)] = {kind: index_bytes(IndexPlan(kind, nlist, 32 if dim % 32 == 0 else 8), n, dim)
                         for kind in INDEX_TYPES[1:]}
    return table


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads (1 for single queries: its default threads make one small query several times
    slower)."""
    faiss.omp_set_num_threads(max(1, int(threads)))


def set_parameter(index: faiss.Index, plan: IndexPlan, value: int) -> None:
    """Set the plan's search parameter (``nprobe`` / ``efSearch``) on ``index``."""
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    elif plan.kind != "exact":
        faiss.extract_index_ivf(index).nprobe = int(value)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def build(vectors: np.ndarray, plan: IndexPlan, train_rows: np.ndarray | None = None, seed: int = 0) -> faiss.Index:
    """The plan's index holding ``vectors`` (n, d) in row order (IVF trained on ``train_rows``, default: a seeded
    sample of at most 64 points per list)."""
    vectors = _as_matrix(vectors)
    n, dim = vectors.shape
    index = faiss.index_factory(dim, plan.factory(dim), faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 40
    if not index.is_trained:
        if train_rows is None:
            rng = np.random.default_rng(seed)
            train_rows = np.sort(rng.choice(n, size=min(n, 64 * max(plan.nlist, 4)), replace=False))
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        if plan.kind == "ivf_pq":
            faiss.downcast_index(ivf).do_polysemous_training = False  # minutes, for a search mode not used here
        index.train(vectors[train_rows])
    for start in range(0, n, 65536):
        index.add(vectors[start: start + 65536])
    return index


@dataclass
class Tuning:
    """The tuned parameter and the recall it reaches on ``queries`` held-out vectors."""

    parameter: str | None
    value: int | None
    recall: float
    target: float
    target_met: bool
    queries: int


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest inner products of each query over ``vectors`` (brute force, FAISS Flat)."""
    return faiss.knn(_as_matrix(queries), _as_matrix(vectors), k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found_k & truth_k| / k, each query's own id removed from both lists first."""
    total = 0.0
    for row, own in enumerate(query_ids):
        got = [i for i in found[row] if i != own and i >= 0][:k]
        want = [i for i in truth[row] if i != own][:k]
        total += len(set(got) & set(want)) / max(len(want), 1)
    return total / max(len(query_ids), 1)


def tune(index: faiss.Index, plan: IndexPlan, vectors: np.ndarray, query_ids: np.ndarray, target: float = 0.95,
         k: int = 10) -> Tuning:
    """Raise the plan's parameter through powers of two until recall@k >= ``target`` (module docstring)."""
    if plan.kind == "exact" or len(query_ids) == 0:
        return Tuning(None, None, 1.0, target, True, int(len(query_ids)))
    queries = _as_matrix(vectors[query_ids])
    truth = exact_neighbours(vectors, queries, k + 1)
    limit = plan.nlist if plan.kind != "hnsw" else 4096
    value, recall = 1 if plan.kind != "hnsw" else 16, 0.0
    while True:
        set_parameter(index, plan, value)
        recall = recall_at_k(index.search(queries, k + 1)[1], truth, query_ids, k)
        if recall >= target or value >= limit:
            break
        value = min(value * 2, limit)
    return Tuning(PARAMETER[plan.kind], value, recall, target, recall >= target, int(len(query_ids)))


def held_out_sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct row ids (sorted) drawn from ``n`` with a seeded generator."""
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=min(size, n), replace=False))


def build_and_tune(vectors: np.ndarray, plan: IndexPlan, target: float = 0.95, sample: int = 500,
                   seed: int = 0) -> tuple[faiss.Index, dict]:
    """Build the plan's index over ``vectors``, tune it on a held-out sample, and describe it (kind, factory,
    parameter, recall, bytes, bytes per million vectors, build seconds)."""
    n, dim = vectors.shape
    began = time.perf_counter()
    queries = held_out_sample(n, sample if plan.kind != "exact" else 0, seed)
    train_rows = None
    if plan.kind.startswith("ivf"):
        pool = np.setdiff1d(np.arange(n), queries)
        rng = np.random.default_rng(seed)
        train_rows = np.sort(rng.choice(pool, size=min(len(pool), 64 * plan.nlist), replace=False))
    index = build(vectors, plan, train_rows, seed)
    built = time.perf_counter() - began
    tuning = tune(index, plan, vectors, queries, target)
    size = len(faiss.serialize_index(index))
    report = {"kind": plan.kind, "factory": plan.factory(dim), "count": int(n), "dim": int(dim),
              "build_seconds": round(built, 3), "bytes": size,
              "bytes_per_million": int(size / max(n, 1) * 1_000_000) if n else 0,
              "estimated_bytes_per_million": index_bytes(IndexPlan(plan.kind, ivf_lists(1_000_000), plan.pq_bytes),
                                                         1_000_000, dim),
              "tuning": asdict(tuning)}
    return index, report


def save_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically."""
    data = faiss.serialize_index(index)
    atomic_write_bytes(Path(path), lambda handle: handle.write(data.tobytes()))


def load_index(path: Path, plan: IndexPlan, value: int | None) -> faiss.Index:
    """The index saved at ``path`` with its tuned search parameter set (memory-mapped where FAISS can)."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise CheckpointError(f"{path} cannot be read ({str(error).splitlines()[0][:200]})") from None
    if value is not None:
        set_parameter(index, plan, value)
    return index
