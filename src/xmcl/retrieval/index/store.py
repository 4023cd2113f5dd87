"""The metadata store of an index: SQLite, embedded, one file (``items.sqlite``).

SQLite rather than Parquet: an index is updated in place (files added, changed and removed between runs), a crash
must never lose or tear what was committed (transactions, write-ahead log), and the server looks items up by id
among millions (primary-key B-trees); Parquet files are immutable and read by column, so every update would rewrite
them. SQLite ships with Python: no dependency.

Tables: ``items`` (id, path relative to the collection root, size, mtime_ns, caption, fields as JSON, shard and
row of its embedding), ``captions`` (id, item id, text, shard, row), ``failures`` (path, size, mtime_ns, error) and
``shards`` (id, kind, file). Ids are never reused (AUTOINCREMENT), so an id names one item for the index's life.
Writes happen on the indexing side only; the server opens the file read-only, one connection per thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

from xmcl.errors import CheckpointError

STORE_FILE = "items.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, file TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    caption TEXT, fields TEXT NOT NULL DEFAULT '{}', shard INTEGER NOT NULL REFERENCES shards(id),
    row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    text TEXT NOT NULL, shard INTEGER NOT NULL REFERENCES shards(id), row INTEGER NOT NULL, UNIQUE (item_id, text));
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, error TEXT NOT NULL);
"""
TABLE_OF = {"images": "items", "captions": "captions"}


class MetadataStore:
    """The store at ``folder/items.sqlite`` (created when writable and absent)."""

    def __init__(self, folder: Path | str, readonly: bool = False) -> None:
        self.path = Path(folder) / STORE_FILE
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist: not an xmcl index (build one with `xmcl index`)")
        self._local = threading.local()
        if not readonly:
            with self._connection() as db:
                db.executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if self.readonly:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def check_integrity(self) -> None:
        """``CheckpointError`` naming the file when SQLite finds it damaged (``PRAGMA quick_check``); such a store
        cannot be repaired in place."""
        try:
            result = self._connection().execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            result = str(error)
        if result != "ok":
            raise CheckpointError(f"{self.path} is damaged ({result}): index the folder again into a new --out "
                                  f"folder (its metadata cannot be repaired in place)")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ------------------------------------------------------------------------------------------- writing
    def shard_known(self, file: str) -> bool:
        return self._connection().execute("SELECT 1 FROM shards WHERE file = ?", (file,)).fetchone() is not None

    def ingest(self, sidecar: dict) -> None:
        """Record a shard and its rows (items or captions) and its failures, in one transaction."""
        db = self._connection()
        with db:
            shard = db.execute("INSERT INTO shards (kind, file) VALUES (?, ?)",
                               (sidecar["kind"], sidecar["file"])).lastrowid
            if sidecar["kind"] == "images":
                db.executemany(
                    "INSERT INTO items (path, size, mtime_ns, caption, fields, shard, row) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(r["path"], r["size"], r["mtime_ns"], r.get("caption"), json.dumps(r.get("fields") or {}),
                      shard, row) for row, r in enumerate(sidecar["rows"])])
                db.executemany("DELETE FROM failures WHERE path = ?", [(r["path"],) for r in sidecar["rows"]])
            else:
                db.executemany("INSERT INTO captions (item_id, text, shard, row) VALUES (?, ?, ?, ?)",
                               [(r["item_id"], r["text"], shard, row) for row, r in enumerate(sidecar["rows"])])
            db.executemany("INSERT OR REPLACE INTO failures (path, size, mtime_ns, error) VALUES (?, ?, ?, ?)",
                           [(f["path"], f["size"], f["mtime_ns"], f["error"]) for f in sidecar["failures"]])

    def remove_items(self, ids: Iterable[int]) -> None:
        """Delete items (and their captions)."""
        db = self._connection()
        with db:
            db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def remove_captions(self, ids: Iterable[int]) -> None:
        db = self._connection()
        with db:
            db.executemany("DELETE FROM captions WHERE id = ?", [(int(i),) for i in ids])

    def remove_failures(self, paths: Iterable[str]) -> None:
        db = self._connection()
        with db:
            db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])

    def set_annotations(self, values: Iterable[tuple[str | None, dict, int]]) -> None:
        """``(caption, fields, item id)`` for each item to update."""
        db = self._connection()
        with db:
            db.executemany("UPDATE items SET caption = ?, fields = ? WHERE id = ?",
                           [(caption, json.dumps(fields), int(i)) for caption, fields, i in values])

    def drop_empty_shards(self) -> list[str]:
        """Delete the records of shards no item or caption refers to; return their files."""
        db = self._connection()
        with db:
            files = [r["file"] for r in db.execute(
                "SELECT file FROM shards WHERE id NOT IN (SELECT shard FROM items) "
                "AND id NOT IN (SELECT shard FROM captions)")]
            db.executemany("DELETE FROM shards WHERE file = ?", [(f,) for f in files])
        return files

    def forget_shard(self, file: str) -> None:
        """Delete a shard's record with the items (and their captions) and captions whose vectors it holds: they are
        encoded again by the next pass (a damaged or missing shard file)."""
        db = self._connection()
        with db:
            shard = db.execute("SELECT id FROM shards WHERE file = ?", (file,)).fetchone()
            if shard is not None:
                db.execute("DELETE FROM captions WHERE shard = ?", (shard[0],))
                db.execute("DELETE FROM items WHERE shard = ?", (shard[0],))
                db.execute("DELETE FROM shards WHERE id = ?", (shard[0],))

    # ------------------------------------------------------------------------------------------- reading
    def shard_rows(self) -> dict[str, int]:
        """``file -> rows it must hold`` (its largest referenced row + 1) of every shard in use."""
        rows = self._connection().execute(
            "SELECT s.file, MAX(t.row) + 1 FROM shards s JOIN (SELECT shard, row FROM items UNION ALL "
            "SELECT shard, row FROM captions) t ON t.shard = s.id GROUP BY s.file")
        return {r[0]: r[1] for r in rows}

    def items_by_path(self) -> dict[str, tuple[int, int, int]]:
        """``path -> (id, size, mtime_ns)`` of every item."""
        rows = self._connection().execute("SELECT id, path, size, mtime_ns FROM items")
        return {r["path"]: (r["id"], r["size"], r["mtime_ns"]) for r in rows}

    def failures(self) -> dict[str, dict]:
        """``path -> {size, mtime_ns, error}`` of every file that could not be encoded."""
        rows = self._connection().execute("SELECT path, size, mtime_ns, error FROM failures ORDER BY path")
        return {r["path"]: {"size": r["size"], "mtime_ns": r["mtime_ns"], "error": r["error"]} for r in rows}

    def caption_keys(self) -> dict[tuple[int, str], int]:
        """``(item id, text) -> caption id`` of every caption."""
        rows = self._connection().execute("SELECT id, item_id, text FROM captions")
        return {(r["item_id"], r["text"]): r["id"] for r in rows}

    def vector_rows(self, kind: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """For ``kind`` ("images" / "captions"): ids in id order, the shard file of each, and its row there."""
        rows = self._connection().execute(
            f"SELECT t.id, s.file, t.row FROM {TABLE_OF[kind]} t JOIN shards s ON s.id = t.shard ORDER BY t.id"
        ).fetchall()
        return (np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                np.array([r[2] for r in rows], dtype=np.int64))

    def vector_location(self, kind: str, id_: int) -> tuple[str, int] | None:
        row = self._connection().execute(
            f"SELECT s.file, t.row FROM {TABLE_OF[kind]} t JOIN shards s ON s.id = t.shard WHERE t.id = ?",
            (int(id_),)).fetchone()
        return (row[0], row[1]) if row else None

    def items(self, ids: Iterable[int]) -> dict[int, dict]:
        """``id -> {id, path, size, mtime_ns, caption, fields}`` of the given items that exist."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._connection().execute(
            f"SELECT id, path, size, mtime_ns, caption, fields FROM items WHERE id IN ({marks})", ids)
        return {r["id"]: {"id": r["id"], "path": r["path"], "size": r["size"], "mtime_ns": r["mtime_ns"],
                          "caption": r["caption"], "fields": json.loads(r["fields"])} for r in rows}

    def captions(self, ids: Iterable[int]) -> dict[int, dict]:
        """``id -> {id, item_id, text}`` of the given captions that exist."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._connection().execute(f"SELECT id, item_id, text FROM captions WHERE id IN ({marks})", ids)
        return {r["id"]: {"id": r["id"], "item_id": r["item_id"], "text": r["text"]} for r in rows}

    def captions_of(self, item_id: int) -> list[str]:
        rows = self._connection().execute("SELECT text FROM captions WHERE item_id = ? ORDER BY id", (int(item_id),))
        return [r[0] for r in rows]

    def count_captions_of(self, item_ids: Iterable[int]) -> int:
        """How many captions the items ``item_ids`` hold (removed with them)."""
        db = self._connection()
        return sum(db.execute("SELECT COUNT(*) FROM captions WHERE item_id = ?", (int(i),)).fetchone()[0]
                   for i in item_ids)

    def count(self, kind: str) -> int:
        return int(self._connection().execute(f"SELECT COUNT(*) FROM {TABLE_OF[kind]}").fetchone()[0])
