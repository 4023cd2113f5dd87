"""Index folders under faults: odd files in the image folder are skipped and listed, a second writer is refused, a
broken pending shard or a damaged file never leaves a folder that a rerun cannot repair or a server that answers
wrongly, and a server notices an index rebuilt in place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.errors import CheckpointError, RunFolderError
from xmcl.retrieval.index import shards
from xmcl.retrieval.index.build import IndexOptions, build_index
from xmcl.retrieval.index.search import CollectionIndex, Searcher
from xmcl.retrieval.retriever import Retriever
from xmcl.runtime.lock import RunLock

from search_world import copy_images

QUIET = IndexOptions(progress=False, shard_size=4)


def small_folder(world: Path, target: Path, count: int = 6) -> Path:
    return copy_images(world, target, [f"shapes_{n:06d}.png" for n in range(count)])


def small_index(world: Path, retriever: Retriever, tmp_path: Path) -> tuple[Path, Path]:
    """Six photos and their index (shards of four): ``(photos, index folder)``."""
    photos, out = small_folder(world, tmp_path / "photos"), tmp_path / "index"
    build_index(retriever, photos, out, options=QUIET)
    return photos, out


def test_odd_entries_are_skipped_and_listed_and_the_rest_is_indexed(world: Path, retriever: Retriever,
                                                                    tmp_path: Path) -> None:
    photos = small_folder(world, tmp_path / "photos")
    good = photos / "shapes_000000.png"
    bad_name = os.fsencode(photos) + b"/bad\xff.png"
    shutil.copy(good, bad_name)
    os.mkfifo(photos / "pipe.jpg")
    outside = tmp_path / "outside.png"
    shutil.copy(good, outside)
    (photos / "link.png").symlink_to(outside)
    (photos / "dangling.png").symlink_to(tmp_path / "gone.png")
    report = build_index(retriever, photos, tmp_path / "index", options=QUIET)
    assert report["images"] == 6
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert reasons == {
        "bad\\xff.png": "the file name is not valid UTF-8: rename the file",
        "pipe.jpg": "not a regular file",
        "link.png": "a link to a file outside the folder (pass --follow-links to index it)",
        "dangling.png": "a dangling link, or the file vanished"}
    followed = build_index(retriever, photos, tmp_path / "followed", options=IndexOptions(
        progress=False, follow_links=True))
    assert followed["images"] == 7 and "link.png" not in {e["path"] for e in followed["skipped"]}


def test_the_cli_warns_when_files_are_skipped_or_nothing_is_found(world: Path, checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    links = tmp_path / "links"
    links.mkdir()
    for n in range(3):
        (links / f"photo{n}.png").symlink_to(world / "images" / f"shapes_{n:06d}.png")
    result = CliRunner().invoke(main, ["index", "--checkpoint", str(checkpoint), "--images", str(links), "--out",
                                       str(tmp_path / "index"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: no image was indexed" in result.output
    assert "warning: 3 image files skipped" in result.output and "--follow-links" in result.output


def test_a_pending_shard_the_store_refuses_is_discarded_and_its_files_encoded_again(
        world: Path, retriever: Retriever, tmp_path: Path) -> None:
    photos = small_folder(world, tmp_path / "photos")
    out = tmp_path / "index"
    build_index(retriever, photos, out, options=QUIET)
    shutil.rmtree(out)
    # the state an older version left: a pending shard whose row names a path the store cannot hold
    rows = [{"path": "shapes_000000.png\udcff", "size": 1, "mtime_ns": 1, "caption": None, "fields": {}}]
    out.mkdir()
    shards.write_shard(out, "images", [[0.0] * retriever.dim], rows, [])
    with pytest.warns(UserWarning, match="a pending shard that cannot be stored"):
        report = build_index(retriever, photos, out, options=QUIET)
    assert report["images"] == 6 and not shards.pending_sidecars(out)
    assert build_index(retriever, photos, out, options=QUIET)["encoded"] == 0  # and the folder stays healthy


def test_a_second_writer_is_refused_naming_the_holder(world: Path, retriever: Retriever, tmp_path: Path) -> None:
    photos = small_folder(world, tmp_path / "photos")
    out = tmp_path / "index"
    with RunLock(out, "index folder"):
        with pytest.raises(RunFolderError, match=r"index folder .* is in use by pid \d+"):
            build_index(retriever, photos, out, options=QUIET)
    assert build_index(retriever, photos, out, options=QUIET)["images"] == 6


@pytest.fixture
def index_copy(built_index: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(built_index, copy)
    return copy


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "images.faiss").unlink(), "images.faiss is missing"),
    (lambda d: (d / "images.ids.npy").unlink(), "images.ids.npy is missing"),
    (lambda d: (d / "images.faiss").write_bytes((d / "images.faiss").read_bytes()[:200]), "images.faiss cannot be"),
    (lambda d: (d / "items.sqlite").write_bytes(b"not a database" * 100), "items.sqlite is damaged"),
    (lambda d: (d / "report.json").write_text(json.dumps({**json.loads((d / "report.json").read_text()),
                                                          "indexes": {"images": {"count": 3}}})),
     "records 3 images but"),
])
def test_a_damaged_index_is_refused_at_open_naming_the_file_and_the_repair(index_copy: Path, checkpoint: Path,
                                                                          damage, named: str) -> None:
    damage(index_copy)
    with pytest.raises(CheckpointError, match=named):
        CollectionIndex.open(index_copy)
    result = CliRunner().invoke(main, ["search", str(index_copy), "a red circle", "--checkpoint", str(checkpoint)])
    assert result.exit_code == 2 and named.split()[0] in result.output and "Traceback" not in result.output
    if "damaged" not in named:
        assert "rerun `xmcl index" in result.output


def test_a_server_reopens_an_index_rebuilt_in_place_and_says_when_it_cannot(world: Path, retriever: Retriever,
                                                                            tmp_path: Path) -> None:
    photos, out = small_index(world, retriever, tmp_path)
    searcher = Searcher(CollectionIndex.open(out), retriever)
    assert len(searcher.search(text="a red circle", k=10)) == 6
    for name in ("shapes_000001.png", "shapes_000003.png"):
        next(photos.rglob(name)).unlink()
    build_index(retriever, photos, out, options=QUIET)
    assert searcher.index.count("images") == 4 and len(searcher.search(text="a red circle", k=10)) == 4
    assert searcher.stale is None
    report = json.loads((out / "report.json").read_text())
    report["indexes"]["images"]["count"] = 99  # a new generation that does not open
    (out / "report.json").write_text(json.dumps(report))
    assert len(searcher.search(text="a red circle", k=10)) == 4  # the last good generation keeps serving
    assert "records 99 images" in searcher.stale


def test_counts_of_unmatched_and_removed_captions_are_whole(world: Path, retriever: Retriever, tmp_path: Path) -> None:
    photos = small_folder(world, tmp_path / "photos", count=4)
    captions = tmp_path / "captions.tsv"
    paths = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    lines = [f"{path}\tcaption {n} {c}" for n, path in enumerate(paths) for c in range(3)]
    lines += [f"missing_{n}.png\tnot here" for n in range(150)]
    captions.write_text("\n".join(lines) + "\n")
    first = build_index(retriever, photos, tmp_path / "index", captions, options=QUIET)
    assert first["captions"] == 12 and first["captions_unmatched_count"] == 150
    assert len(first["captions_unmatched"]) == 100  # the report lists the first 100
    next(photos.rglob("shapes_000002.png")).unlink()
    second = build_index(retriever, photos, tmp_path / "index", captions, options=QUIET)
    assert second["captions"] == 9 and second["captions_removed"] == 3


def test_a_damaged_shard_is_named_and_a_rerun_re_encodes_its_items(world: Path, retriever: Retriever,
                                                                   tmp_path: Path) -> None:
    photos, out = small_index(world, retriever, tmp_path)
    searcher = Searcher(CollectionIndex.open(out), retriever)
    file, _ = searcher.index.store.vector_location("images", 1)
    (out / "shards" / file).write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=f"{file}: missing or unreadable embedding shard"):
        searcher.search(item=1, k=3)
    with pytest.warns(UserWarning, match="a missing or damaged embedding shard"):
        report = build_index(retriever, photos, out, options=QUIET)
    assert report["images"] == 6 and report["encoded"] == 4  # the damaged shard's four items, and no other
    assert len(Searcher(CollectionIndex.open(out), retriever).search(text="a red circle", k=10)) == 6
