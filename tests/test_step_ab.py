"""benchmarks/step_ab.py's export of another commit's package: its imports point at the renamed package alone."""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import step_ab  # noqa: E402

from xmcl.nn.gpo import positional_encoding  # noqa: E402


def test_the_exported_package_imports_itself_not_the_working_tree(tmp_path, monkeypatch):
    step_ab.export_package("HEAD", tmp_path)
    package = tmp_path / step_ab.BASE_PACKAGE
    sources = list(package.rglob("*.py"))
    assert (package / "nn" / "gpo.py") in sources
    for source in sources:
        text = source.read_text()
        assert "from xmcl." not in text and "from xmcl import" not in text and "import xmcl." not in text, source
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        base_gpo = importlib.import_module(f"{step_ab.BASE_PACKAGE}.nn.gpo")
        assert base_gpo.length_mask.__module__ == f"{step_ab.BASE_PACKAGE}.nn.sequence"
        assert not any(name == "xmcl" or name.startswith("xmcl.") for name in
                       (getattr(value, "__module__", "") for value in vars(base_gpo).values()))
        torch.testing.assert_close(base_gpo.positional_encoding(5, 8), positional_encoding(5, 8))
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == step_ab.BASE_PACKAGE]:
            del sys.modules[name]
