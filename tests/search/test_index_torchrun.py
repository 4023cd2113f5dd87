"""``torchrun --nproc_per_node 2 -m xmcl index``: each rank encodes its share of the files and captions, rank 0 merges
and builds the index; the result equals a one-process index of the same folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xmcl.retrieval.index.build import IndexOptions, build_index, gather_vectors
from xmcl.retrieval.index.store import MetadataStore
from xmcl.retrieval.retriever import Retriever

from search_world import copy_images

pytestmark = pytest.mark.slow  # minutes of training, subprocesses or a browser: `make test-fast` leaves it out

SRC = Path(__file__).resolve().parents[2] / "src"


def by_path(index: Path, kind: str) -> dict:
    store = MetadataStore(index, readonly=True)
    ids, matrix = gather_vectors(index, store, kind)
    if kind == "images":
        names = {i: item["path"] for i, item in store.items(ids).items()}
    else:
        captions = store.captions(ids)
        items = store.items(c["item_id"] for c in captions.values())
        names = {i: (items[c["item_id"]]["path"], c["text"]) for i, c in captions.items()}
    return {names[int(i)]: row for i, row in zip(ids, matrix)}


def test_two_ranks_build_the_same_index_as_one(world: Path, checkpoint: Path, retriever: Retriever,
                                               tmp_path: Path) -> None:
    folder = copy_images(world, tmp_path / "photos", [f"shapes_{n:06d}.png" for n in range(0, 30, 3)])
    (folder / "broken.png").write_bytes(b"not a png")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "xmcl", "index",
               "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "ranks"),
               "--captions", str(world / "dataset_shapes.json"), "--device", "cpu", "--shard-size", "2"]
    run = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "10 images (10 encoded" in run.stdout and "on 2 process(es)" in run.stdout

    build_index(retriever, folder, tmp_path / "one", world / "dataset_shapes.json",
                IndexOptions(shard_size=2, progress=False))
    report = json.loads((tmp_path / "ranks" / "report.json").read_text())
    assert report["world_size"] == 2 and [f["path"] for f in report["failures"]] == ["broken.png"]
    assert not list((tmp_path / "ranks" / "shards").glob("*.json"))  # every rank's shards ingested
    ranks_written = {p.name.split("-")[1] for p in (tmp_path / "ranks" / "shards").glob("*.npy")}
    assert ranks_written == {"r0", "r1"}
    for kind in ("images", "captions"):
        two, one = by_path(tmp_path / "ranks", kind), by_path(tmp_path / "one", kind)
        assert sorted(two) == sorted(one) and len(one) > 0
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=1e-3)
