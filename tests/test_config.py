"""Config machinery: YAML + overrides build typed nested dataclasses; bad keys and values are named."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from xmcl.config import config_from_dict, config_to_dict, load_config, save_config
from xmcl.errors import ConfigError


@dataclass
class Inner:
    lr: float = 0.1
    steps: list[int] = field(default_factory=lambda: [10, 20])
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "run"
    seed: int = 0
    flag: bool = False
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides_build_typed_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  lr: 1\n  steps: [3]\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "flag=true", "limit=5", "inner.lr=2e-3"])
    assert cfg == Outer(name="x", flag=True, limit=5, inner=Inner(lr=0.002, steps=[3], mode="b"))
    assert isinstance(cfg.inner.lr, float)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = Outer(name="y", limit=None, inner=Inner(steps=[1, 2, 3]))
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Outer, tmp_path / "saved.yaml") == cfg
    assert config_from_dict(Outer, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.lrr=1"], "'inner.lrr'"),
        (["seed=abc"], "'seed' must be an integer"),
        (["inner.mode=c"], "'inner.mode' must be one of"),
        (["flag=1"], "'flag' must be true or false"),
        (["novalue"], "key=value"),
        (["name.sub=1"], "'name' must be a string"),
        (["seed=2", "seed.sub=1"], "not a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)
