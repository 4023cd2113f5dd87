"""Config machinery: YAML + overrides build typed nested dataclasses; bad keys and values are named."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from xmcl.config import config_from_dict, config_to_dict, load_config
from xmcl.distill.config import DistillOptimConfig
from xmcl.errors import ConfigError
from xmcl.retrieval.clip.config import ClipOptimConfig
from xmcl.retrieval.config import RetrievalOptimConfig, RetrievalTrainConfig


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
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
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


@pytest.mark.parametrize("overrides, message", [
    (["optim.batch_size=-4"], r"'optim.batch_size' = -4 is out of range: must be >= 2"),
    (["optim.lr=-0.1"], r"'optim.lr' = -0.1 is out of range: must be > 0.0"),
    (["model.embed_dim=0"], r"'model.embed_dim' = 0 is out of range: must be >= 1"),
    (["run.log_every=0"], r"'run.log_every' = 0 is out of range: must be >= 1"),
    (["optim.lr_decay_epochs=[3, 0]"], r"'optim.lr_decay_epochs' = \[3, 0\] is out of range: must be >= 1"),
    (["model.sge_dropout=1.0"], r"'model.sge_dropout' = 1.0 is out of range: must be >= 0.0 and < 1.0"),
])
def test_values_out_of_range_are_refused_at_load_naming_key_value_and_range(overrides, message) -> None:
    with pytest.raises(ConfigError, match=r"config \(with overrides\): " + message):
        load_config(RetrievalTrainConfig, None, overrides)


def test_cross_field_rules_name_their_section() -> None:
    from xmcl.distill.config import DistillConfig

    with pytest.raises(ConfigError, match=r"data: 'image_size' must be \[height, width\], got \[32\]"):
        load_config(DistillConfig, None, ["data.image_size=[32]"])


def test_a_partial_section_keeps_the_systems_own_defaults() -> None:
    """distill's run section defaults to a checkpoint every 100 steps; setting only its seed keeps that."""
    from xmcl.distill.config import DistillConfig

    cfg = load_config(DistillConfig, None, ["run.seed=3"])
    assert (cfg.run.seed, cfg.run.checkpoint_every, cfg.run.log_every) == (3, 100, 10)


def test_shipped_configs_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xmcl.config import SHIPPED_CONFIGS, find_config

    monkeypatch.chdir(tmp_path)
    for name in ("shapes_user", "shapes_user.yaml", "configs/shapes_user.yaml"):
        assert find_config(name) == SHIPPED_CONFIGS / "shapes_user.yaml"
    (tmp_path / "shapes_user.yaml").write_text("run:\n  seed: 4\n")
    assert find_config("shapes_user.yaml") == Path("shapes_user.yaml")  # a file that exists wins
    assert find_config(tmp_path / "elsewhere" / "shapes_user.yaml") == tmp_path / "elsewhere" / "shapes_user.yaml"


def _numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, bool, bool]]:
    """Dotted keys of every int / float field (lists and optionals of them too) of a config, with whether the
    field holds floats and whether it is a list."""
    import dataclasses
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _numeric_keys(hint, f"{prefix}{f.name}.")
            continue
        text = str(hint)
        if ("int" in text or "float" in text) and "Literal" not in text:
            keys.append((f"{prefix}{f.name}", "float" in text, text.startswith("list")))
    return keys


TRAIN_CONFIGS = ["xmcl.retrieval.config:RetrievalTrainConfig", "xmcl.retrieval.clip.config:ClipTrainConfig",
                 "xmcl.distill.config:DistillConfig"]


@pytest.mark.parametrize("target", TRAIN_CONFIGS)
def test_every_number_of_every_config_is_range_checked_at_load(target: str) -> None:
    """An absurd value (minus a billion; infinity for floats) of any numeric key is refused at load, naming the
    key, the value and the allowed range: no number reaches a run unchecked."""
    import importlib
    import re

    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    keys = _numeric_keys(cls)
    assert len(keys) > 15
    for key, is_float, is_list in keys:
        for value in ["-1000000000"] + ([".inf"] if is_float else []):
            value = f"[{value}, {value}]" if is_list else value
            with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' = .* is out of range: must be "):
                load_config(cls, None, [f"{key}={value}"])


def test_a_device_that_torch_does_not_know_is_refused_at_load() -> None:
    from xmcl.retrieval.config import RetrievalTrainConfig

    with pytest.raises(ConfigError, match=r"'run.device' = 'gpu0' is out of range: must be 'auto' or a torch device"):
        load_config(RetrievalTrainConfig, None, ["run.device=gpu0"])


def _write(folder, name: str, text: str):
    path = folder / name
    path.write_text(text)
    return path


def test_a_base_chain_is_composed_key_by_key_with_lists_replaced_whole(tmp_path):
    _write(tmp_path, "a.yaml", "model:\n  embed_dim: 64\n  word_dim: 32\noptim:\n  lr_decay_epochs: [3, 6]\n  epochs: 9\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\nmodel:\n  word_dim: 48\noptim:\n  lr_decay_epochs: [5]\n")
    c = _write(tmp_path, "c.yaml", "base: b.yaml\noptim:\n  epochs: 7\n")
    cfg = load_config(RetrievalTrainConfig, c, ["model.embed_dim=128"])
    assert (cfg.model.embed_dim, cfg.model.word_dim) == (128, 48)
    assert cfg.optim.lr_decay_epochs == [5] and cfg.optim.epochs == 7
    assert cfg.model.pooling == RetrievalTrainConfig().model.pooling  # what no file sets keeps its default


def test_a_shipped_config_can_be_a_base_and_the_shipped_variants_are_overlays(tmp_path):
    mine = _write(tmp_path, "mine.yaml", "base: shapes_user\noptim:\n  epochs: 2\n")
    shipped = load_config(RetrievalTrainConfig, "shapes_user")
    assert load_config(RetrievalTrainConfig, mine).model == shipped.model
    best = load_config(RetrievalTrainConfig, "flickr8k_locked_tolerant")
    locked = load_config(RetrievalTrainConfig, "flickr8k_locked")
    assert best.model == locked.model and best.data == locked.data and best.optim == locked.optim
    assert (best.loss.gamma, best.loss.mu, best.loss.tolerance, best.loss.balance) == (0.5, 30.0, "quantile", True)


def test_a_base_chain_that_loops_is_refused_naming_the_chain(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"chain comes back to a file: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(RetrievalTrainConfig, tmp_path / "a.yaml")


def test_an_error_names_the_base_file_that_set_the_key(tmp_path):
    _write(tmp_path, "a.yaml", "model:\n  embed_dim: -4\n  colour: red\n")
    child = _write(tmp_path, "child.yaml", "base: a.yaml\noptim:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"a\.yaml \(the base of .*child\.yaml\).*'model\.colour'"):
        load_config(RetrievalTrainConfig, child)
    _write(tmp_path, "a.yaml", "model:\n  embed_dim: -4\n")
    with pytest.raises(ConfigError, match=r"a\.yaml \(the base of .*child\.yaml\).*embed_dim"):
        load_config(RetrievalTrainConfig, child)
    with pytest.raises(ConfigError, match="'base' must name a config file"):
        load_config(RetrievalTrainConfig, _write(tmp_path, "bad.yaml", "base: 3\n"))


def test_compose_writes_each_file_and_its_base_chain_over_the_ones_before(tmp_path):
    from xmcl.config import compose

    data = _write(tmp_path, "data.yaml", "model:\n  embed_dim: 64\n  sge: true\noptim:\n  lr_decay_epochs: [3, 6]\n")
    _write(tmp_path, "queued.yaml", "model:\n  use_queue: true\n  sge: false\n")
    variant = _write(tmp_path, "variant.yaml",
                     "base: queued.yaml\nmodel:\n  cge: true\noptim:\n  lr_decay_epochs: [5]\n")
    assert compose(data, variant) == {"model": {"embed_dim": 64, "sge": False, "use_queue": True, "cge": True},
                                      "optim": {"lr_decay_epochs": [5]}}  # sections key by key, lists whole
    assert compose(variant, data)["model"]["sge"] is True  # the last file wins
    cfg = config_from_dict(RetrievalTrainConfig, compose("shapes_user", variant))  # a shipped config by its name
    shipped = load_config(RetrievalTrainConfig, "shapes_user")
    assert (cfg.model.cge, cfg.model.use_queue, cfg.model.sge, cfg.optim.lr_decay_epochs) == (True, True, False, [5])
    assert cfg.data == shipped.data and cfg.model.embed_dim == shipped.model.embed_dim
    assert config_from_dict(RetrievalTrainConfig, compose("shapes_user")) == shipped


@pytest.mark.parametrize("section", [RetrievalOptimConfig, ClipOptimConfig, DistillOptimConfig])
@pytest.mark.parametrize("field_name,value,allowed", [
    ("lr", 0.0, "> 0.0 and <= 10.0"), ("lr", 11.0, "> 0.0 and <= 10.0"), ("weight_decay", -0.1, ">= 0.0 and <= 1.0")])
def test_every_optimiser_section_checks_the_shared_ranges(section: type, field_name: str, value: float,
                                                          allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field_name}' = {value} is out of range: must be {allowed}"):
        section(**{field_name: value})


def test_renamed_keys_still_load_with_a_note_naming_the_new_key(tmp_path: Path) -> None:
    old = _write(tmp_path, "old.yaml", "loss:\n  lambda_batch: 20.0\n  temperature: 0.05\nmodel:\n"
                                        "  key_modes: switch\n  key_encoders_eval: false\n")
    with pytest.warns(FutureWarning) as notes:
        cfg = load_config(RetrievalTrainConfig, old, ["loss.lambda_batch=3"])  # an override may use the old name
    said = " ".join(str(note.message) for note in notes)
    for old_key, new_key in (("loss.lambda_batch", "loss.batch_weight"), ("loss.temperature", "loss.init_temperature"),
                             ("model.key_encoders_eval", "model.key_modes")):
        assert f"'{old_key}' is now '{new_key}'" in said
    assert (cfg.loss.batch_weight, cfg.loss.init_temperature, cfg.model.key_modes) == (3.0, 0.05, "follow")
    new = _write(tmp_path, "new.yaml", "base: old.yaml\nloss:\n  batch_weight: 7.0\n")  # the overlay's new name wins
    with pytest.warns(FutureWarning):
        assert load_config(RetrievalTrainConfig, new).loss.batch_weight == 7.0


@pytest.mark.parametrize("saved_model,modes", [({"key_modes": "switch"}, "eval"),
                                               ({"key_modes": "switch", "key_encoders_eval": True}, "eval"),
                                               ({"key_modes": "authors", "key_encoders_eval": False}, "authors"),
                                               ({}, "eval")])
def test_a_saved_config_reads_the_merged_key_modes(saved_model: dict, modes: str) -> None:
    saved = {"model": saved_model, "loss": {"lambda_batch": 2.0}}
    cfg = config_from_dict(RetrievalTrainConfig, saved, where="x/last.pt")
    assert (cfg.model.key_modes, cfg.loss.batch_weight) == (modes, 2.0)


def test_both_names_of_a_key_are_refused_naming_them(tmp_path: Path) -> None:
    both = _write(tmp_path, "both.yaml", "loss:\n  lambda_batch: 1.0\n  batch_weight: 2.0\n")
    with pytest.raises(ConfigError, match=r"both\.yaml: section 'loss': 'lambda_batch' and 'batch_weight' are both "
                                          r"set"):
        load_config(RetrievalTrainConfig, both)


def test_run_compile_is_refused_by_st_slidr_and_taken_by_retrieval():
    from xmcl.distill.config import DistillConfig

    with pytest.raises(ConfigError, match=r"'run.compile' = True .*sparse 3D networks"):
        load_config(DistillConfig, None, ["run.compile=true"])
    assert load_config(RetrievalTrainConfig, None, ["run.compile=true"]).run.compile
    assert not load_config(DistillConfig, None, []).run.compile


def test_run_compile_on_cpu_without_a_cpp_compiler_is_refused_at_the_start(monkeypatch: pytest.MonkeyPatch):
    from xmcl.runtime.run_config import RunConfig, start_run

    monkeypatch.setenv("CXX", "no-such-compiler-xmcl")
    with pytest.raises(ConfigError, match="run.compile: true needs a C\\+\\+ compiler .*no-such-compiler-xmcl"):
        start_run(RunConfig(device="cpu", compile=True))
    start_run(RunConfig(device="cpu", compile=False))  # without compile the compiler does not matter
