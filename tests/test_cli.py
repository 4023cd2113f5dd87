"""The command line: commands delegate, and a bad input ends with one clear line and exit status 2."""

import json
from pathlib import Path

from click.testing import CliRunner

from xmcl.cli import main


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "features", "train", "evaluate", "demo", "distill", "train-clip", "clip-cache"):
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


def test_train_clip_then_clip_cache(tmp_path: Path) -> None:
    world = tmp_path / "w"
    assert CliRunner().invoke(main, ["data", "shapes", "--out", str(world), "--images", "20", "--size", "64"]
                              ).exit_code == 0
    tiny = ["model.image_size=32", "model.patch_size=8", "model.width=32", "model.layers=1", "model.heads=1",
            "model.embed_dim=8", "model.context_length=24", "optim.batch_size=8", "optim.epochs=2", "run.device=cpu"]
    result = CliRunner().invoke(main, ["train-clip", "--data", str(world), "--out", str(tmp_path / "clip")]
                                + [arg for item in tiny for arg in ("--set", item)])
    assert result.exit_code == 0, result.output
    assert "best val rSum" in result.output and (tmp_path / "clip" / "model.safetensors").is_file()

    result = CliRunner().invoke(main, ["clip-cache", "--clip", str(tmp_path / "clip"), "--data", str(world),
                                       "--split", "val", "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["dim"] == 8 and list(manifest["splits"]) == ["val"] and manifest["splits"]["val"]["complete"]


def test_clip_cache_names_a_clip_folder_without_config(tmp_path: Path) -> None:
    world, clip = tmp_path / "w", tmp_path / "clip"
    CliRunner().invoke(main, ["data", "shapes", "--out", str(world), "--images", "20", "--size", "64"])
    clip.mkdir()
    result = CliRunner().invoke(main, ["clip-cache", "--clip", str(clip), "--data", str(world), "--out",
                                       str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert f"CLIP directory {clip} has no config.json" in result.output and "Traceback" not in result.output


def test_the_cli_runs_as_a_module() -> None:
    """``python -m xmcl`` is the same CLI (``torchrun -m xmcl`` launches it that way)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "xmcl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train-clip" in result.stdout and "distill" in result.stdout
