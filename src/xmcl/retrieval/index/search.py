"""Searching a built index: query vectors -> the nearest images or captions, with their metadata.

``CollectionIndex.open(folder)`` reads an index folder (``build``) read-only: its manifest, the metadata store and
the FAISS indexes with their tuned parameter. ``Searcher`` pairs it with the ``Retriever`` of the checkpoint that
built it (any other checkpoint is refused: its embeddings live in another space) and answers a query given as a
caption, an image, an embedding or an indexed item (its stored embedding: "more like this"). Files are reached
only through an item's id, and only inside the indexed folder.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from xmcl.errors import CheckpointError, DataError
from xmcl.retrieval.index import shards, vectors
from xmcl.retrieval.index.build import KINDS, REPORT, read_manifest
from xmcl.retrieval.index.store import MetadataStore
from xmcl.retrieval.retriever import ImageInput, Retriever

MAX_K = 1000
TARGETS = KINDS


class QueryError(DataError):
    """A query that cannot be answered as given (empty text, wrong embedding width, k out of range, ...)."""


@dataclass
class _Vectors:
    index: object
    ids: np.ndarray


class CollectionIndex:
    """A built index folder, read-only (safe to search from several threads)."""

    def __init__(self, folder: Path, manifest: dict, report: dict) -> None:
        """Open and check the folder: the store's integrity, and for each kind the vector index and its ids against
        the store's and the report's counts; ``CheckpointError`` naming the damaged file and the repair."""
        self.folder, self.manifest, self.report = folder, manifest, report
        self.stamp = report_stamp(folder)
        self.root = Path(manifest["root"]).resolve()
        self.dim = int(manifest["dim"])
        self.sha256: str = manifest["checkpoint_sha256"]
        rerun = f"rerun `xmcl index --images {self.root} --out {folder}` (with the same model) to rebuild it"
        self.store = MetadataStore(folder, readonly=True)
        self.store.check_integrity()
        self._vectors: dict[str, _Vectors | None] = {}
        for kind in KINDS:
            count = self.store.count(kind)
            recorded = int(report.get("indexes", {}).get(kind, {}).get("count") or 0)
            if recorded != count:
                raise CheckpointError(f"{folder / REPORT} records {recorded} {kind} but {self.store.path} holds "
                                      f"{count}: the index was changed after it was built; {rerun}")
            self._vectors[kind] = self._open_vectors(kind, report["indexes"][kind], rerun) if count else None

    def _open_vectors(self, kind: str, info: dict, rerun: str) -> _Vectors:
        path, ids_path = self.folder / f"{kind}.faiss", self.folder / f"{kind}.ids.npy"
        for needed in (path, ids_path):
            if not needed.is_file():
                raise CheckpointError(f"{needed} is missing; {rerun}")
        plan = vectors.IndexPlan(info["kind"], info.get("nlist", 0), info.get("pq_bytes", 0))
        try:
            index = vectors.load_index(path, plan, info["tuning"]["value"])
            ids = np.load(ids_path, allow_pickle=False)
        except (CheckpointError, OSError, ValueError) as error:
            raise CheckpointError(f"{error}; {rerun}") from None
        if index.ntotal != len(ids) or index.d != self.dim or len(ids) != info["count"]:
            raise CheckpointError(f"{path}: {index.ntotal} vectors of {index.d} dimensions and {len(ids)} ids, but "
                                  f"the index records {info['count']} of {self.dim}; {rerun}")
        return _Vectors(index, ids)

    @classmethod
    def open(cls, folder: Path | str, expected: Sequence[str] = (), expected_from: str = "") -> "CollectionIndex":
        """The index at ``folder``; ``CheckpointError`` when it is not a finished index or was built by a model whose
        sha256 is not one of ``expected`` (a model's identities, named by ``expected_from``; empty: not checked)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if expected and manifest["checkpoint_sha256"] not in expected:
            raise CheckpointError(
                f"index {folder} was built with model {manifest['checkpoint']} (sha256 "
                f"{manifest['checkpoint_sha256'][:12]}...); {expected_from or 'the model given'} has sha256 "
                f"{expected[0][:12]}...: its embeddings are not comparable; search with the index's model "
                f"or rebuild the index")
        report_path = folder / REPORT
        if not report_path.is_file():
            raise CheckpointError(f"index {folder} is unfinished (no {REPORT}); rerun `xmcl index` to complete it")
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{report_path} cannot be read: {error}") from None
        return cls(folder, manifest, report)

    def count(self, target: str) -> int:
        entry = self._vectors.get(target)
        return 0 if entry is None else len(entry.ids)

    def search(self, queries: np.ndarray, target: str = "images", k: int = 10) -> list[list[tuple[int, float]]]:
        """For each query row, up to ``k`` ``(id, score)`` pairs of ``target``, best first (``k`` up to one more than
        a query may ask: room for an item query's own item)."""
        check_k(k, MAX_K + 1)
        if target not in TARGETS:
            raise QueryError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        entry = self._vectors.get(target)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if entry is None:
            return [[] for _ in queries]
        scores, positions = entry.index.search(queries, min(k, len(entry.ids)))
        return [[(int(entry.ids[p]), float(s)) for p, s in zip(row_p, row_s) if p >= 0]
                for row_p, row_s in zip(positions, scores)]

    def results(self, hits: list[tuple[int, float]], target: str) -> list[dict]:
        """Hits as result records: ``rank, score, id, path, caption`` (+ ``caption_id``, ``text`` for captions)."""
        if target == "captions":
            found = self.store.captions([i for i, _ in hits])
            items = self.store.items(c["item_id"] for c in found.values())
            out = []
            for rank, (cid, score) in enumerate(hits, start=1):
                cap = found.get(cid)
                item = items.get(cap["item_id"]) if cap else None
                if item is not None:
                    out.append({"rank": rank, "score": score, "id": item["id"], "path": item["path"],
                                "caption": cap["text"], "caption_id": cid, "text": cap["text"]})
            return out
        items = self.store.items(i for i, _ in hits)
        return [{"rank": rank, "score": score, "id": i, "path": items[i]["path"], "caption": items[i]["caption"]}
                for rank, (i, score) in enumerate(hits, start=1) if i in items]

    def item(self, item_id: int) -> dict | None:
        """An item's metadata with all its captions, or None."""
        found = self.store.items([item_id]).get(int(item_id))
        if found is not None:
            found["captions"] = self.store.captions_of(item_id)
        return found

    def item_vector(self, item_id: int) -> np.ndarray | None:
        """The stored embedding of an item (float32), or None when there is no such item."""
        location = self.store.vector_location("images", item_id)
        if location is None:
            return None
        file, row = location
        return np.asarray(shards.load_shard(self.folder, file)[row], dtype=np.float32)

    def file_of(self, item_id: int) -> Path | None:
        """The image file of an item, resolved, when it exists inside the indexed folder; else None."""
        item = self.store.items([item_id]).get(int(item_id))
        if item is None:
            return None
        path = (self.root / item["path"]).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def close(self) -> None:
        self.store.close()


def report_stamp(folder: Path) -> tuple[int, int, int] | None:
    """What identifies the generation of an index folder: its ``report.json``'s inode, size and modification time
    (each pass of ``xmcl index`` replaces the file whole); None while there is none."""
    try:
        info = (Path(folder) / REPORT).stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def check_k(k: int, limit: int = MAX_K) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise QueryError(f"k must be an integer from 1 to {limit}, got {k!r}")


class Searcher:
    """An index and the retriever of its checkpoint: ``search(text=... | image=... | embedding=... | item=...)``."""

    def __init__(self, index: CollectionIndex, retriever: Retriever) -> None:
        if index.sha256 not in retriever.identities:
            raise CheckpointError(
                f"index {index.folder} was built with model {index.manifest['checkpoint']} (sha256 "
                f"{index.sha256[:12]}...), not {retriever.source} (sha256 {retriever.sha256[:12]}...): its embeddings "
                f"are not comparable; search with the index's model or rebuild the index")
        self._index, self.retriever = index, retriever
        self.stale: str | None = None
        self._reopening = threading.Lock()

    @property
    def index(self) -> CollectionIndex:
        """The index; reopened first when ``xmcl index`` has rebuilt it in place since it was opened (its
        ``report.json`` replaced: a new generation). A new generation that does not open keeps the old one serving
        and ``stale`` says why; a clean reopen clears it."""
        if report_stamp(self._index.folder) != self._index.stamp and self._reopening.acquire(blocking=False):
            try:
                if report_stamp(self._index.folder) != self._index.stamp:
                    self._reopen()
            finally:
                self._reopening.release()
        return self._index

    def _reopen(self) -> None:
        try:
            fresh = CollectionIndex.open(self._index.folder, self.retriever.identities, self.retriever.source)
        except (CheckpointError, OSError) as error:
            self.stale = f"the index was updated on disk but its new generation cannot be opened: {error}"
            self._index.stamp = report_stamp(self._index.folder)  # not retried until the report changes again
            return
        self._index, self.stale = fresh, None

    @classmethod
    def open(cls, folder: Path | str, checkpoint: Path | str | None = None, device: str = "auto",
             **retriever_options) -> "Searcher":
        """The index at ``folder`` with ``checkpoint`` (a checkpoint, model directory or shipped model's name;
        default: the one it records) loaded as a retriever."""
        manifest = read_manifest(Path(folder))
        checkpoint = Path(checkpoint) if checkpoint is not None else Path(manifest["checkpoint"])
        retriever = Retriever.load(checkpoint, device, **retriever_options)
        return cls(CollectionIndex.open(folder, retriever.identities, str(checkpoint)), retriever)

    def query_vector(self, text: str | None = None, image: ImageInput | None = None,
                     embedding: list[float] | np.ndarray | None = None, item: int | None = None) -> np.ndarray:
        """The unit query vector ``(dim,)`` of exactly one of the query forms (``QueryError`` otherwise)."""
        given = [name for name, value in (("text", text), ("image", image), ("embedding", embedding),
                                          ("item", item)) if value is not None]
        if len(given) != 1:
            raise QueryError(f"give exactly one of text, image, embedding, item (got {', '.join(given) or 'none'})")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise QueryError("the query text is empty")
            return self.retriever.encode_texts([text])[0].numpy()
        if image is not None:
            return self.retriever.encode_images([image])[0].numpy()
        if item is not None:
            vector = self.index.item_vector(item)
            if vector is None:
                raise QueryError(f"no item {item} in index {self.index.folder.name}")
            return vector / max(float(np.linalg.norm(vector)), 1e-12)
        try:
            vector = np.asarray(embedding, dtype=np.float64)  # float64: the norm of float32-range values stays finite
        except (OverflowError, TypeError, ValueError):
            raise QueryError("the embedding must be a list of numbers within float64's range") from None
        if vector.shape != (self.index.dim,):
            raise QueryError(f"the embedding must be a list of {self.index.dim} numbers, got shape {vector.shape}")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(vector).all() or norm == 0.0 or not np.isfinite(norm):
            raise QueryError("the embedding must be finite and not all zero")
        return (vector / norm).astype(np.float32)

    def search(self, target: str = "images", k: int = 10, **query) -> list[dict]:
        """The ``k`` best ``target`` results of one query (see ``query_vector`` and ``CollectionIndex.results``); an
        item query ("more like this") leaves the item itself out of its images, ranks counted without it."""
        check_k(k)
        item = query.get("item")
        own = item is not None and target == "images"
        hits = self.index.search(self.query_vector(**query)[None], target, k + own)[0]
        if own:
            hits = [hit for hit in hits if hit[0] != item][:k]
        return self.index.results(hits, target)


def parse_index_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=FOLDER`` or ``FOLDER`` (named by its last component) -> ``{name: folder}``; a repeated name is refused."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if name in named:
            raise QueryError(f"two indexes are named {name!r}; name them with NAME=INDEX")
        named[name] = Path(path)
    return named


def open_searchers(folders: dict[str, Path], device: str = "auto", runtime: str = "torch",
                   threads: int = 1) -> dict[str, Searcher]:
    """A ``Searcher`` per named index folder; indexes built with the same model share one retriever (on
    ``runtime``, ``threads`` ONNX Runtime threads per query)."""
    retrievers: dict[str, Retriever] = {}
    searchers = {}
    for name, folder in folders.items():
        checkpoint = str(Path(read_manifest(folder)["checkpoint"]).resolve())
        if checkpoint not in retrievers:
            retrievers[checkpoint] = Retriever.load(checkpoint, device, runtime=runtime, threads=threads)
        retriever = retrievers[checkpoint]
        searchers[name] = Searcher(CollectionIndex.open(folder, retriever.identities, checkpoint), retriever)
    return searchers


def format_results(results: list[dict], width: int = 60) -> str:
    """A readable table of results: rank, score, path, caption (cut to ``width`` characters)."""
    if not results:
        return "no results"
    path_width = min(max(len(r["path"]) for r in results), 48)
    lines = [f"{'rank':>4}  {'score':>6}  {'path':<{path_width}}  caption"]
    for r in results:
        caption = r.get("caption") or ""
        caption = caption if len(caption) <= width else caption[: width - 3] + "..."
        lines.append(f"{r['rank']:>4}  {r['score']:>6.3f}  {r['path']:<{path_width}}  {caption}")
    return "\n".join(lines)
