"""Indexing a folder: unreadable files reported and skipped, incremental reruns that encode only what changed, resume
after kill -9, exact search equal to brute force, the three caption formats, and the checkpoint-hash refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmcl.errors import CheckpointError
from xmcl.retrieval.index import shards
from xmcl.retrieval.index.build import IndexOptions, build_index, gather_vectors
from xmcl.retrieval.index.collection import read_captions, scan_images
from xmcl.retrieval.index.search import CollectionIndex, Searcher
from xmcl.retrieval.index.store import MetadataStore
from xmcl.retrieval.retriever import Retriever
from xmcl.runtime.checkpoint import read_checkpoint, save_checkpoint

from search_world import copy_images

QUIET = IndexOptions(shard_size=4, progress=False)
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture()
def counted(retriever: Retriever, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images encoded per batch by the session's retriever."""
    calls: list[int] = []
    original = Retriever.encode_prepared

    def encode(self, batch):
        calls.append(len(batch["pixels"]))
        return original(self, batch)

    monkeypatch.setattr(Retriever, "encode_prepared", encode)
    return calls


def stored_by_path(index: Path) -> dict[str, np.ndarray]:
    store = MetadataStore(index, readonly=True)
    ids, matrix = gather_vectors(index, store, "images")
    paths = store.items(ids)
    return {paths[int(i)]["path"]: row for i, row in zip(ids, matrix)}


def test_unreadable_files_are_reported_and_skipped(world: Path, retriever: Retriever, tmp_path: Path,
                                                   counted: list[int]) -> None:
    folder = copy_images(world, tmp_path / "photos", [f"shapes_{n:06d}.png" for n in range(6)])
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    png = (world / "images" / "shapes_000007.png").read_bytes()
    (folder / "sub" / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.open(world / "images" / "shapes_000008.png").save(folder / "sub" / "converted.WEBP", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    report = build_index(retriever, folder, tmp_path / "idx", options=QUIET)

    assert sorted(f["path"] for f in report["failures"]) == ["broken.jpg", "sub/truncated.png"]
    assert all(f["error"] for f in report["failures"])
    assert report["images"] == 7 and report["encoded"] == 7 and sum(counted) == 7
    stored = stored_by_path(tmp_path / "idx")
    assert sorted(stored) == sorted(f.path for f in scan_images(folder).files if "broken" not in f.path
                                    and "truncated" not in f.path)
    fresh = retriever.encode_images([folder / p for p in sorted(stored)]).numpy()
    np.testing.assert_allclose(np.stack([stored[p] for p in sorted(stored)]), fresh, atol=1e-3)
    assert json.loads((tmp_path / "idx" / "report.json").read_text())["failures"] == report["failures"]

    counted.clear()
    again = build_index(retriever, folder, tmp_path / "idx", options=QUIET)
    assert sum(counted) == 0 and again["encoded"] == 0 and again["reused"] == 7
    assert [f["path"] for f in again["failures"]] == ["broken.jpg", "sub/truncated.png"]


def test_a_rerun_adds_new_files_drops_removed_ones_and_reencodes_only_changes(world: Path, retriever: Retriever,
                                                                              tmp_path: Path,
                                                                              counted: list[int]) -> None:
    names = [f"shapes_{n:06d}.png" for n in range(10)]
    folder = copy_images(world, tmp_path / "photos", names)
    build_index(retriever, folder, tmp_path / "idx", options=QUIET)
    before = MetadataStore(tmp_path / "idx", readonly=True).items_by_path()

    (folder / "shapes_000000.png").unlink()
    (folder / "sub" / "shapes_000001.png").unlink()
    shutil.copy(world / "images" / "shapes_000020.png", folder / "new_a.png")
    shutil.copy(world / "images" / "shapes_000021.png", folder / "sub" / "new_b.png")
    shutil.copy(world / "images" / "shapes_000022.png", folder / "shapes_000002.png")  # changed content
    counted.clear()
    report = build_index(retriever, folder, tmp_path / "idx", options=QUIET)

    assert sum(counted) == 3 and report["encoded"] == 3 and report["removed"] == 2 and report["changed"] == 1
    after = MetadataStore(tmp_path / "idx", readonly=True).items_by_path()
    assert sorted(after) == sorted(f.path for f in scan_images(folder).files)
    for path in set(before) & set(after) - {"shapes_000002.png"}:
        assert after[path][0] == before[path][0]  # unchanged items keep their id
    assert after["shapes_000002.png"][0] not in {i for i, _, _ in before.values()}
    stored = stored_by_path(tmp_path / "idx")
    np.testing.assert_allclose(stored["shapes_000002.png"],
                               retriever.encode_images([world / "images" / "shapes_000022.png"])[0].numpy(), atol=1e-3)
    index = CollectionIndex.open(tmp_path / "idx")
    hits = index.results(index.search(np.stack(list(stored.values())), "images", 20)[0], "images")
    assert {h["path"] for h in hits} == set(after)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from xmcl.retrieval.index import build, shards
    from xmcl.retrieval.index.build import IndexOptions, build_index
    from xmcl.retrieval.retriever import Retriever

    written = []
    original = shards.write_shard
    def write_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        written.append(path)
        if len(written) == 2:   # the second shard is on disk, not yet ingested
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    build.shards.write_shard = write_then_die
    build_index(Retriever.load(sys.argv[1], "cpu"), sys.argv[2], sys.argv[3],
                options=IndexOptions(shard_size=4, progress=False))
""")


def test_an_indexing_pass_killed_with_sigkill_resumes_where_it_stopped(world: Path, checkpoint: Path,
                                                                       retriever: Retriever, tmp_path: Path,
                                                                       counted: list[int]) -> None:
    folder = copy_images(world, tmp_path / "photos", [f"shapes_{n:06d}.png" for n in range(14)])
    killed = subprocess.run([sys.executable, "-c", KILLER, str(checkpoint), str(folder), str(tmp_path / "idx")],
                            env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(shards.pending_sidecars(tmp_path / "idx")) == 1
    assert MetadataStore(tmp_path / "idx", readonly=True).count("images") == 4

    counted.clear()
    report = build_index(retriever, folder, tmp_path / "idx", options=QUIET)
    assert sum(counted) == 14 - 8 and report["resumed_shards"] == 1 and report["images"] == 14
    assert not shards.pending_sidecars(tmp_path / "idx")

    build_index(retriever, folder, tmp_path / "straight", options=QUIET)
    resumed, straight = stored_by_path(tmp_path / "idx"), stored_by_path(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight)
    for path in straight:
        np.testing.assert_allclose(resumed[path], straight[path], atol=1e-3)


def test_exact_search_equals_brute_force(world: Path, built_index: Path, retriever: Retriever) -> None:
    index = CollectionIndex.open(built_index)
    assert index.report["indexes"]["images"]["kind"] == "exact"
    files = sorted((world / "images").glob("*.png"))
    vectors = retriever.encode_images(files).numpy().astype(np.float16).astype(np.float32)
    queries = retriever.encode_texts(["a red circle", "two blue squares on a dark grey background", "a star"]).numpy()
    scores = queries @ vectors.T
    for q, hits in enumerate(index.search(queries, "images", 10)):
        order = np.argsort(-scores[q], kind="stable")[:10]
        results = index.results(hits, "images")
        assert [r["path"] for r in results] == [files[i].name for i in order]
        np.testing.assert_allclose([r["score"] for r in results], scores[q][order], atol=2e-3)


def test_captions_in_three_formats(world: Path, retriever: Retriever, tmp_path: Path) -> None:
    karpathy = read_captions(world / "dataset_shapes.json")
    entry = json.loads((world / "dataset_shapes.json").read_text())["images"][0]
    assert karpathy[entry["filename"]].captions == [s["raw"] for s in entry["sentences"]]
    assert karpathy[entry["filename"]].fields["split"] == entry["split"]

    folder = copy_images(world, tmp_path / "photos", ["shapes_000000.png", "shapes_000001.png"])
    lines = [{"path": "shapes_000000.png", "caption": "a first caption", "photographer": "ada", "year": 2024},
             {"file": "sub/shapes_000001.png", "captions": ["one", "two"]},
             {"path": "missing.png", "caption": "matches no file"}]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    tsv = tmp_path / "caps.txt"
    tsv.write_text("shapes_000000.png\ta first caption\n\nsub/shapes_000001.png\tone\nsub/shapes_000001.png\ttwo\n")
    assert {k: v.captions for k, v in read_captions(tsv).items()} == \
        {k: v.captions for k, v in read_captions(jsonl).items() if k != "missing.png"}

    report = build_index(retriever, folder, tmp_path / "idx", jsonl, QUIET)
    assert report["captions"] == 3 and report["captions_unmatched"] == ["missing.png"]
    searcher = Searcher(CollectionIndex.open(tmp_path / "idx"), retriever)
    item = searcher.index.item(searcher.search(text="a first caption", target="captions", k=1)[0]["id"])
    assert item["path"] == "shapes_000000.png" and item["fields"] == {"photographer": "ada", "year": 2024}
    own = searcher.search(image=folder / "sub" / "shapes_000001.png", target="captions", k=3)
    assert {r["text"] for r in own} == {"one", "two", "a first caption"}

    report = build_index(retriever, folder, tmp_path / "idx", tsv, QUIET)  # same captions: nothing re-encoded
    assert report["captions_encoded"] == 0 and report["captions_removed"] == 0 and report["captions"] == 3


def test_another_checkpoint_is_refused(built_index: Path, checkpoint: Path, tmp_path: Path, world: Path) -> None:
    state = read_checkpoint(checkpoint)
    other = tmp_path / "other.pt"
    save_checkpoint(other, state["kind"], state["version"],
                    {**{k: v for k, v in state.items() if k not in ("kind", "version")}, "epoch": 99})
    stranger = Retriever.load(other, "cpu")
    with pytest.raises(CheckpointError, match="not comparable"):
        Searcher(CollectionIndex.open(built_index), stranger)
    with pytest.raises(CheckpointError, match="not comparable"):
        Searcher.open(built_index, other, "cpu")
    with pytest.raises(CheckpointError, match="holds embeddings of checkpoint"):
        build_index(stranger, world / "images", built_index, options=QUIET)
