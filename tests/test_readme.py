"""README.md tells the truth: its Python quickstart imports from the package top and runs on real photos, ``import
xmcl`` stays light, and its command table names every ``xmcl`` command, each once."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import xmcl
from xmcl.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"


def python_quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no Python block"
    return blocks[0]


def command_names(group: click.Group, prefix: str = "xmcl") -> list[str]:
    names = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            names += command_names(command, f"{prefix} {name}")
        else:
            names.append(f"{prefix} {name}")
    return names


def test_the_python_quickstart_imports_the_public_api_from_the_package_top() -> None:
    imports = re.findall(r"^\s*(?:from (\S+) import (.+)|import (.+))$", python_quickstart(), re.M)
    assert imports, "the quickstart imports nothing"
    for module, names, plain in imports:
        assert module == "xmcl" and not plain, f"the quickstart imports from {module or plain}, not from xmcl"
        for name in (n.strip() for n in names.split(",")):
            assert name in xmcl.__all__, f"{name} is not in xmcl.__all__"
            assert getattr(xmcl, name) is not None


def test_import_xmcl_loads_neither_torch_nor_the_retrieval_layer() -> None:
    probe = "import sys, xmcl; print(sorted(m for m in ('torch', 'xmcl.retrieval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_public_names_are_the_library_classes() -> None:
    from xmcl.retrieval.index.search import Searcher
    from xmcl.retrieval.retriever import Retriever

    assert xmcl.Retriever is Retriever and xmcl.Searcher is Searcher
    with pytest.raises(AttributeError):
        xmcl.NoSuchName  # noqa: B018 - the attribute access is the test


def test_the_command_table_names_every_command_once() -> None:
    rows = re.findall(r"^\| `(xmcl [a-z -]+)` \|", README.read_text(encoding="utf-8"), re.M)
    assert sorted(rows) == sorted(command_names(main))


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the Flickr8K photos of ../shared are not here")
def test_the_python_quickstart_runs_on_real_photos(tmp_path, monkeypatch, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    names = sorted(p.name for p in (FLICKR / "images").glob("*.jpg"))[:6]
    for name in names:
        shutil.copy(FLICKR / "images" / name, photos / name)
    shutil.copy(photos / names[0], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["index", "--checkpoint", "flickr8k", "--images", "photos", "--out",
                                       "runs/photos", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    capsys.readouterr()

    namespace: dict = {}
    exec(compile(python_quickstart(), str(README), "exec"), namespace)  # noqa: S102 - the README's own lines

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and all(line.split()[1] in names for line in printed)
    assert tuple(namespace["scores"].shape) == (1, 1)
