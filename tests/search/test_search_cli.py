"""``xmcl index`` and ``xmcl search``: the summary, the table and --json output agree with the library."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.retrieval.index.search import CollectionIndex, Searcher
from xmcl.retrieval.retriever import Retriever

from search_world import copy_images


def test_index_command_prints_the_report(world: Path, checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_images(world, tmp_path / "photos", [f"shapes_{n:06d}.png" for n in range(5)])
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    result = CliRunner().invoke(main, ["index", "--checkpoint", str(checkpoint), "--images", str(folder),
                                       "--out", str(tmp_path / "idx"), "--captions", str(world / "dataset_shapes.json"),
                                       "--device", "cpu", "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    # the Karpathy file names the world's files at its root: the two copied into sub/ get no captions
    assert f"{tmp_path / 'idx'}: 5 images (5 encoded, 0 reused, 0 removed, 0 changed), 15 captions" in result.output
    assert "1 unreadable files skipped" in result.output and "bad.png:" in result.output
    assert "images: Flat, exact search" in result.output and "per million vectors" in result.output


def test_search_prints_a_table_and_json(built_index: Path, retriever: Retriever) -> None:
    expected = Searcher(CollectionIndex.open(built_index), retriever).search(text="a red circle", k=4)
    table = CliRunner().invoke(main, ["search", str(built_index), "a red circle", "-k", "4", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path", "caption"] and len(lines) == 5
    for line, result in zip(lines[1:], expected):
        rank, score, path = line.split()[:3]
        assert (int(rank), path) == (result["rank"], result["path"])
        assert abs(float(score) - result["score"]) < 5e-4

    as_json = CliRunner().invoke(main, ["search", str(built_index), "a red circle", "-k", "4", "--json",
                                        "--device", "cpu"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    assert payload["query"] == {"text": "a red circle"} and payload["target"] == "images"
    assert [(r["id"], r["path"]) for r in payload["results"]] == [(r["id"], r["path"]) for r in expected]


def test_search_by_image_finds_it_and_its_captions(built_index: Path, world: Path) -> None:
    image = world / "images" / "shapes_000004.png"
    found = json.loads(CliRunner().invoke(main, ["search", str(built_index), "--image", str(image), "-k", "3",
                                                 "--json", "--device", "cpu"]).output)
    assert found["results"][0]["path"] == "shapes_000004.png" and found["results"][0]["score"] > 0.999
    captions = json.loads(CliRunner().invoke(main, ["search", str(built_index), "--image", str(image), "-k", "5",
                                                    "--target", "captions", "--json", "--device", "cpu"]).output)
    assert len(captions["results"]) == 5 and all("text" in r for r in captions["results"])


def test_search_needs_exactly_one_query(built_index: Path, world: Path) -> None:
    neither = CliRunner().invoke(main, ["search", str(built_index)])
    both = CliRunner().invoke(main, ["search", str(built_index), "a dog", "--image", str(world / "images" / "x.png")])
    for result in (neither, both):
        assert result.exit_code == 2 and "give one query: a text, --image or --item" in result.output


def test_serve_names_indexes_and_shares_a_checkpoint(built_index: Path) -> None:
    import pytest

    from xmcl.errors import DataError
    from xmcl.retrieval.index.search import open_searchers, parse_index_specs

    named = parse_index_specs([str(built_index), f"again={built_index}"])
    assert named == {built_index.name: built_index, "again": built_index}
    searchers = open_searchers(named, "cpu")
    assert searchers["again"].retriever is searchers[built_index.name].retriever
    with pytest.raises(DataError, match="two indexes are named 'x'"):
        parse_index_specs([f"x={built_index}", f"x={built_index}"])


@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--port", "99999"), ("--port", "0"),
                                           ("--max-upload-mb", "-1"), ("--max-upload-mb", "0")])
def test_serve_refuses_an_option_out_of_range_before_loading_anything(built_index: Path, monkeypatch,
                                                                      option: str, value: str) -> None:
    monkeypatch.setattr(Retriever, "load", lambda *a, **k: pytest.fail("serve loaded a model"))
    result = CliRunner().invoke(main, ["serve", str(built_index), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output


def test_serve_says_a_port_in_use_before_loading_the_models(built_index: Path, monkeypatch) -> None:
    monkeypatch.setattr(Retriever, "load", lambda *a, **k: pytest.fail("serve loaded a model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(built_index), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "serving" not in result.output


def test_search_by_item_leaves_the_item_out(built_index: Path, retriever: Retriever) -> None:
    searcher = Searcher(CollectionIndex.open(built_index), retriever)
    nearest = searcher.search(embedding=searcher.index.item_vector(5), k=4)
    result = CliRunner().invoke(main, ["search", str(built_index), "--item", "5", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.stdout)["results"]] == [r["id"] for r in nearest if r["id"] != 5][:3]
    result = CliRunner().invoke(main, ["search", str(built_index), "a cat", "--item", "5"])
    assert result.exit_code == 2 and "give one query" in result.output
