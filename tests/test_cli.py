"""The command line: commands delegate, and a bad input ends with one clear line and exit status 2."""

import json
from pathlib import Path

from click.testing import CliRunner

from xmcl.cli import main


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "features", "train", "evaluate", "demo", "distill"):
        assert command in result.output


def test_data_shapes_writes_a_karpathy_corpus(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "shapes", "--out", str(tmp_path / "w"), "--images", "20",
                                       "--seed", "3", "--size", "64"])
    assert result.exit_code == 0, result.output
    corpus = json.loads((tmp_path / "w" / "dataset_shapes.json").read_text())
    assert len(corpus["images"]) == 20
    assert all(len(image["sentences"]) == 5 for image in corpus["images"])


def test_missing_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "absent.pt")])
    assert result.exit_code == 2
    assert "error:" in result.output and "absent.pt does not exist" in result.output
    assert "Traceback" not in result.output


def test_bad_override_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  epochs: 1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--set", "optim.epoch=2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "'optim.epoch'" in result.output
