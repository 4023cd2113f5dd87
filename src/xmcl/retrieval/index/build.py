"""An indexing pass: image folder (+ captions) -> embeddings in shards, metadata in SQLite, FAISS indexes, report.

Layout of an index folder::

    index.json        {"format", "checkpoint", "checkpoint_sha256", "dim", "root"}: what made it
    items.sqlite      the metadata store (``store``)
    shards/*.npy      float16 embeddings, one file per encoding pass of ``shard_size`` files (``shards``)
    images.faiss / captions.faiss, *.ids.npy     the vector indexes and the item / caption id of each of their rows
    report.json       counts, the files that could not be read, each index's kind, parameter, recall and memory

A pass is resumable and incremental: files already in the store with the same size and modification time are
never encoded again; new and changed files are; removed files (and the captions of removed or changed files) are
dropped; files that failed before are skipped until they change. Shards are ingested one by one, so a pass killed
at any moment (``kill -9``) continues where it stopped when rerun. Under ``torchrun`` each rank encodes every
``world``-th file (and caption) and rank 0 ingests every shard and builds the vector indexes.
"""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmcl.errors import CheckpointError, ConfigError
from xmcl.retrieval.index import shards, vectors
from xmcl.retrieval.index.collection import Annotation, ImageFile, read_captions, scan_images
from xmcl.retrieval.index.store import MetadataStore
from xmcl.retrieval.retriever import Retriever
from xmcl.runtime.distributed import World, barrier, close_world, init_world
from xmcl.runtime.files import atomic_save_npy, atomic_write_json
from xmcl.runtime.lock import RunLock

INDEX_FORMAT = "xmcl-index/1"
MANIFEST = "index.json"
REPORT = "report.json"
WORK = "work.json"
KINDS = ("images", "captions")
LARGE_COLLECTION = 100_000  # from this many vectors the report prints its memory estimates at 1M and 100M


@dataclass
class IndexOptions:
    """How a pass runs: files per shard (the resume unit), encoding batch size and decoding workers, the vector
    index type (``vectors.INDEX_TYPES``), the memory budget in bytes (None: half the RAM), the recall@10 target
    and the size of the held-out tuning sample, progress bars, and whether links to files outside the folder are
    followed."""

    shard_size: int = 2048
    batch_size: int = 32
    num_workers: int = 0
    index_type: str = "auto"
    memory_budget: int | None = None
    recall_target: float = 0.95
    tuning_sample: int = 500
    progress: bool = True
    seed: int = 0
    follow_links: bool = False

    def __post_init__(self) -> None:
        for name in ("shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.num_workers}")
        if not 0.0 < self.recall_target <= 1.0:
            raise ConfigError(f"recall target must lie in (0, 1], got {self.recall_target}")
        if self.index_type not in vectors.INDEX_TYPES:
            raise ConfigError(f"index type {self.index_type!r} is not one of {', '.join(vectors.INDEX_TYPES)}")


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(folder: Path) -> dict:
    """The ``index.json`` of an index folder; ``CheckpointError`` when it is not one."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not an xmcl index (no {MANIFEST}); build one with `xmcl index`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise CheckpointError(f"{path} is not an xmcl index manifest (format {INDEX_FORMAT!r} expected)")
    return manifest


def _open_manifest(out: Path, retriever: Retriever, root: Path) -> dict:
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest["checkpoint_sha256"] not in retriever.identities:
            raise CheckpointError(f"index {out} holds embeddings of checkpoint {manifest['checkpoint']} (sha256 "
                                  f"{manifest['checkpoint_sha256'][:12]}...), not of {retriever.source} (sha256 "
                                  f"{retriever.sha256[:12]}...); use another --out to index with this checkpoint")
        if manifest["root"] != str(root):
            raise CheckpointError(f"index {out} indexes the folder {manifest['root']}, not {root}; use another --out")
        return manifest
    manifest = {"format": INDEX_FORMAT, "checkpoint": retriever.source, "checkpoint_sha256": retriever.sha256,
                "dim": retriever.dim, "root": str(root),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


# -------------------------------------------------------------------------------------------- encoding
class _Decoded(Dataset):
    """Item i: ``(i, prepared tensors or None, error or None)`` for file i (decoding runs in workers)."""

    def __init__(self, root: Path, files: list[ImageFile], retriever: Retriever) -> None:
        self.root, self.files, self.retriever = root, files, retriever

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.retriever.prepare(self.root / self.files[i].path), None
        except Exception as error:  # noqa: BLE001 - an unreadable file is reported and skipped, whatever PIL raised
            return i, None, str(error) or type(error).__name__


def _encode_chunk(retriever: Retriever, root: Path, files: list[ImageFile], options: IndexOptions,
                  bar: tqdm) -> tuple[np.ndarray, list[ImageFile], list[dict]]:
    loader = DataLoader(_Decoded(root, files, retriever), batch_size=options.batch_size,
                        num_workers=options.num_workers, collate_fn=list)
    embeddings, kept, failures = [], [], []
    for batch in loader:
        bar.update(len(batch))
        good = [(i, item) for i, item, _ in batch if item is not None]
        failures += [{"path": files[i].path, "size": files[i].size, "mtime_ns": files[i].mtime_ns, "error": error}
                     for i, item, error in batch if item is None]
        if good:
            stacked = {key: torch.stack([item[key] for _, item in good]) for key in good[0][1]}
            embeddings.append(retriever.encode_prepared(stacked).numpy())
            kept += [files[i] for i, _ in good]
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, retriever.dim), np.float32)
    return matrix, kept, failures


def _forget_damaged_shards(store: MetadataStore, out: Path) -> list[str]:
    """Shards the store refers to whose file is missing or unreadable or holds too few rows: their items and
    captions are forgotten (so this pass encodes them again) with a warning; returns their files."""
    damaged = []
    for file, rows in store.shard_rows().items():
        try:
            if len(shards.load_shard(out, file)) >= rows:
                continue
        except CheckpointError:
            pass
        warnings.warn(f"{out / shards.SHARD_DIR / file}: a missing or damaged embedding shard; its items are "
                      f"encoded again", stacklevel=2)
        store.forget_shard(file)
        damaged.append(file)
    return damaged


def _ingest_pending(store: MetadataStore, out: Path) -> int:
    """Ingest every complete shard whose sidecar is still there; return how many. A sidecar the store cannot take
    (unreadable, or rows it refuses) is discarded with its shard, with a warning: its files are not in the store,
    so this pass encodes them again, and the folder never stays broken."""
    count = 0
    for sidecar in shards.pending_sidecars(out):
        try:
            data = shards.read_sidecar(sidecar)
            if not store.shard_known(data["file"]):
                store.ingest(data)
                count += 1
        except (CheckpointError, sqlite3.Error, UnicodeError, KeyError, TypeError, ValueError) as error:
            warnings.warn(f"{sidecar}: a pending shard that cannot be stored ({error}); discarded, its files are "
                          f"encoded again", stacklevel=2)
            shards.remove_shard(out, sidecar.with_suffix(".npy").name)
        sidecar.unlink()
    return count


# ------------------------------------------------------------------------------------------------ work
def _plan_images(store: MetadataStore, files: list[ImageFile]) -> dict:
    """Which files to encode and which items to drop (with how many captions go with them), from the store and the
    folder's current files."""
    known, failed = store.items_by_path(), store.failures()
    present = {f.path: f for f in files}
    drop = [item_id for path, (item_id, size, mtime) in known.items()
            if path not in present or (present[path].size, present[path].mtime_ns) != (size, mtime)]
    dropped_captions = store.count_captions_of(drop)
    stale_failures = [p for p, f in failed.items()
                      if p not in present or (present[p].size, present[p].mtime_ns) != (f["size"], f["mtime_ns"])]
    unchanged = {p for p, (_, size, mtime) in known.items()
                 if p in present and (present[p].size, present[p].mtime_ns) == (size, mtime)}
    skipped = {p for p, f in failed.items() if p not in stale_failures}
    todo = [f for f in files if f.path not in unchanged and f.path not in skipped]
    return {"drop": drop, "dropped_captions": dropped_captions, "stale_failures": stale_failures,
            "todo": [f.__dict__ for f in todo],
            "reused": len(unchanged), "skipped_failures": len(skipped), "removed": sum(p not in present for p in known),
            "changed": sum(p in present and p not in unchanged for p in known)}


def _first_caption(annotation: Annotation | None) -> str | None:
    return annotation.captions[0] if annotation is not None and annotation.captions else None


def _encode_images(retriever: Retriever, root: Path, out: Path, todo: list[ImageFile], store: MetadataStore,
                   annotations: dict[str, Annotation], world: World, options: IndexOptions) -> None:
    mine = todo[world.rank::world.size]
    with tqdm(total=len(mine), unit="img", desc="encoding images", disable=not (options.progress and world.is_main),
              dynamic_ncols=True) as bar:
        for start in range(0, len(mine), options.shard_size):
            chunk = mine[start: start + options.shard_size]
            matrix, kept, failures = _encode_chunk(retriever, root, chunk, options, bar)
            rows = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                     "caption": _first_caption(annotations.get(f.path)),
                     "fields": annotations[f.path].fields if f.path in annotations else {}} for f in kept]
            shards.write_shard(out, "images", matrix, rows, failures, world.rank)
            if world.is_main:
                _ingest_pending(store, out)
            bar.set_postfix(failed=len(failures))


def _plan_captions(store: MetadataStore, annotations: dict[str, Annotation]) -> dict:
    known = store.items_by_path()
    wanted = {(known[path][0], text) for path, a in annotations.items() if path in known for text in a.captions}
    have = store.caption_keys()
    return {"drop": [cid for key, cid in have.items() if key not in wanted],
            "todo": sorted(wanted - set(have)),
            "unmatched": sorted(path for path in annotations if path not in known)}


def _encode_captions(retriever: Retriever, out: Path, todo: list[tuple[int, str]], store: MetadataStore,
                     world: World, options: IndexOptions) -> None:
    mine = todo[world.rank::world.size]
    size = options.shard_size * 4
    with tqdm(total=len(mine), unit="cap", desc="encoding captions", disable=not (options.progress and world.is_main),
              dynamic_ncols=True) as bar:
        for start in range(0, len(mine), size):
            chunk = mine[start: start + size]
            matrix = retriever.encode_texts([text for _, text in chunk], batch_size=max(options.batch_size, 64))
            shards.write_shard(out, "captions", matrix.numpy(), [{"item_id": i, "text": t} for i, t in chunk], [],
                               world.rank)
            if world.is_main:
                _ingest_pending(store, out)
            bar.update(len(chunk))


# --------------------------------------------------------------------------------------------- vectors
def gather_vectors(out: Path, store: MetadataStore, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids (in id order) and their embeddings (float32 holding the stored float16 values) of ``kind``."""
    ids, files, rows = store.vector_rows(kind)
    dim = int(read_manifest(out)["dim"])
    matrix = np.zeros((len(ids), dim), np.float32)
    files_arr = np.array(files, dtype=object)
    for file in dict.fromkeys(files):
        where = np.flatnonzero(files_arr == file)
        matrix[where] = shards.load_shard(out, file)[rows[where]]
    return ids, matrix


def build_vector_indexes(out: Path, store: MetadataStore, options: IndexOptions) -> dict:
    """(Re)build ``images.faiss`` and ``captions.faiss`` from the stored embeddings; return their reports."""
    reports = {}
    for kind in KINDS:
        ids, matrix = gather_vectors(out, store, kind)
        if len(ids) == 0:
            for suffix in (".faiss", ".ids.npy"):
                (out / f"{kind}{suffix}").unlink(missing_ok=True)
            reports[kind] = {"count": 0}
            continue
        plan = vectors.choose_index(len(ids), matrix.shape[1], options.memory_budget, options.index_type)
        index, report = vectors.build_and_tune(matrix, plan, options.recall_target, options.tuning_sample,
                                               options.seed)
        report["nlist"], report["pq_bytes"] = plan.nlist, plan.pq_bytes
        vectors.save_index(index, out / f"{kind}.faiss")
        atomic_save_npy(out / f"{kind}.ids.npy", ids)
        reports[kind] = report
    return reports


# ------------------------------------------------------------------------------------------------- run
def build_index(retriever: Retriever, images: Path | str, out: Path | str, captions: Path | str | None = None,
                options: IndexOptions | None = None) -> dict:
    """Run one indexing pass of the folder ``images`` into the index folder ``out`` (module docstring); return the
    report (also written to ``out/report.json``; on ranks other than 0, an empty dict). Rank 0 holds ``out``'s
    lock for the pass: a second ``xmcl index`` into the same folder is refused at once, naming the holder."""
    options = options or IndexOptions()
    out, root = Path(out), Path(images).resolve()
    world = init_world(retriever.device)
    lock = RunLock(out, "index folder").acquire() if world.is_main else None
    try:
        began = time.perf_counter()
        annotations = read_captions(captions) if captions is not None else {}
        store = MetadataStore(out, readonly=False) if world.is_main else None
        scan = None
        if world.is_main:
            _open_manifest(out, retriever, root)
            resumed = _ingest_pending(store, out)
            _forget_damaged_shards(store, out)
            scan = scan_images(root, options.follow_links)
            plan = _plan_images(store, scan.files)
            store.remove_items(plan["drop"])
            store.remove_failures(plan["stale_failures"])
            plan["resumed_shards"] = resumed
            atomic_write_json(out / WORK, plan)
        barrier(world)
        plan = json.loads((out / WORK).read_text(encoding="utf-8"))
        todo = [ImageFile(**f) for f in plan["todo"]]
        encoded_began = time.perf_counter()
        _encode_images(retriever, root, out, todo, store, annotations, world, options)
        image_seconds = time.perf_counter() - encoded_began
        barrier(world)
        caption_plan = {"drop": [], "todo": [], "unmatched": []}
        if world.is_main:
            _ingest_pending(store, out)
            if captions is not None:
                known = store.items_by_path()
                store.set_annotations((_first_caption(annotations.get(p)),
                                       annotations[p].fields if p in annotations else {}, item_id)
                                      for p, (item_id, _, _) in known.items())
                caption_plan = _plan_captions(store, annotations)
                store.remove_captions(caption_plan["drop"])
            atomic_write_json(out / WORK, {**plan, "captions": caption_plan})
        barrier(world)
        caption_plan = json.loads((out / WORK).read_text(encoding="utf-8"))["captions"]
        _encode_captions(retriever, out, [tuple(t) for t in caption_plan["todo"]], store, world, options)
        barrier(world)
        if not world.is_main:
            return {}
        _ingest_pending(store, out)
        for file in store.drop_empty_shards():
            shards.remove_shard(out, file)
        index_began = time.perf_counter()
        indexes = build_vector_indexes(out, store, options)
        failures = store.failures()
        report = {
            "checkpoint": retriever.source, "checkpoint_sha256": retriever.sha256, "root": str(root),
            "images": store.count("images"), "captions": store.count("captions"),
            "encoded": len(todo) - sum(1 for f in todo if f.path in failures), "reused": plan["reused"],
            "removed": plan["removed"], "changed": plan["changed"], "resumed_shards": plan["resumed_shards"],
            "captions_encoded": len(caption_plan["todo"]),
            "captions_removed": len(caption_plan["drop"]) + plan["dropped_captions"],
            "captions_unmatched_count": len(caption_plan["unmatched"]),
            "captions_unmatched": caption_plan["unmatched"][:100],
            "failures": [{"path": p, "error": f["error"]} for p, f in failures.items()],
            "skipped": scan.skipped,
            "world_size": world.size, "encode_seconds": round(image_seconds, 3),
            "images_per_second": round(len(todo) / image_seconds, 2) if todo and image_seconds > 0 else None,
            "index_seconds": round(time.perf_counter() - index_began, 3),
            "seconds": round(time.perf_counter() - began, 3),
            "indexes": indexes, "memory_per_index_kind": vectors.memory_table(retriever.dim),
        }
        atomic_write_json(out / REPORT, report)
        (out / WORK).unlink(missing_ok=True)
        store.close()
        return report
    finally:
        if lock is not None:
            lock.release()
        close_world(world)


def _gigabytes(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def _first_ten(heading: str, entries: list[str]) -> list[str]:
    """``heading`` and the first ten ``entries`` (indented), and how many more; nothing when there are none."""
    if not entries:
        return []
    more = [f"  ... and {len(entries) - 10} more"] if len(entries) > 10 else []
    return [heading, *(f"  {entry}" for entry in entries[:10]), *more]


def format_report(report: dict, out: Path | str) -> str:
    """The lines ``xmcl index`` prints: counts, skipped files, each vector index with its recall and memory."""
    lines = [f"{out}: {report['images']} images ({report['encoded']} encoded, {report['reused']} reused, "
             f"{report['removed']} removed, {report['changed']} changed), {report['captions']} captions "
             f"({report['captions_encoded']} encoded, {report['captions_removed']} removed)"]
    if report.get("images_per_second"):
        lines.append(f"encoding: {report['images_per_second']:.1f} images/s on {report['world_size']} process(es)")
    if report["images"] == 0:
        lines.append(f"warning: no image was indexed: {report['root']} holds no readable .jpg, .jpeg, .png or .webp "
                     f"file{' that is not skipped (below)' if report['skipped'] else ''}")
    listed = f"all listed in {Path(out) / REPORT}"
    lines += _first_ten(f"warning: {len(report['skipped'])} image files skipped, not indexed ({listed}):",
                        [f"{f['path']}: {f['reason']}" for f in report["skipped"]])
    lines += _first_ten(f"{len(report['failures'])} unreadable files skipped ({listed}):",
                        [f"{f['path']}: {f['error']}" for f in report["failures"]])
    if report["captions_unmatched"]:
        lines.append(f"{report['captions_unmatched_count']} captioned paths match no indexed image "
                     f"(first: {report['captions_unmatched'][0]})")
    for kind, info in report["indexes"].items():
        if not info.get("count"):
            continue
        tuning = info["tuning"]
        tuned = f", {tuning['parameter']}={tuning['value']}" if tuning["parameter"] else ""
        recall = (f"recall@10 {tuning['recall']:.3f} against exact on {tuning['queries']} held-out vectors"
                  f"{'' if tuning['target_met'] else ' (below the target ' + str(tuning['target']) + ')'}"
                  if tuning["parameter"] else "exact search")
        lines.append(f"{kind}: {info['factory']}{tuned}, {recall}; {_gigabytes(info['bytes'])} now, "
                     f"{_gigabytes(info['bytes_per_million'])} per million vectors")
    if report["images"] + report["captions"] >= LARGE_COLLECTION:  # for a small folder the estimates are noise
        table = report["memory_per_index_kind"]
        lines.append("memory by index kind (estimates): " + "; ".join(
            f"{int(n):,} vectors: " + ", ".join(f"{kind} {_gigabytes(size)}" for kind, size in sizes.items())
            for n, sizes in table.items()))
    return "\n".join(lines)
