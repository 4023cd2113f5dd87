"""Typed dataclass configs: YAML files plus ``--set key=value`` overrides, checked against the field types.

``load_config(TrainConfig, path, ["optim.lr=1e-3", "model.sge=false"])`` reads the YAML file, applies the
overrides (values parsed as YAML scalars), and builds the nested dataclasses; an unknown key or a value of the
wrong type raises ``ConfigError`` naming the dotted key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from xmcl.errors import ConfigError

T = TypeVar("T")


def _describe(type_: Any) -> str:
    return getattr(type_, "__name__", None) or str(type_).replace("typing.", "")


def _coerce(value: Any, type_: Any, key: str, where: str) -> Any:
    """Check ``value`` against ``type_`` (int widens to float, lists/tuples element-wise, nested dataclasses)."""
    origin = get_origin(type_)
    if type_ is Any:
        return value
    if origin is Literal:
        if value not in get_args(type_):
            raise ConfigError(f"{where}: '{key}' must be one of {list(get_args(type_))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(type_)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' = {value!r} matches none of {_describe(type_)}")
    if dataclasses.is_dataclass(type_):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping of {type_.__name__} fields, got {value!r}")
        return _build(type_, value, key, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        args = get_args(type_)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if type_ is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if type_ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if type_ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if type_ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return str(value)
    if type_ is Path:
        return Path(value)
    raise ConfigError(f"{where}: '{key}' has an unsupported type {_describe(type_)}")


def _build(cls: type[T], data: dict, prefix: str, where: str) -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = ", ".join(f"'{prefix}.{k}'" if prefix else f"'{k}'" for k in unknown)
        raise ConfigError(f"{where}: unknown key {full}; {cls.__name__} has {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``key.sub=value`` strings to a nested dict; values are parsed as YAML scalars ("1e-3", "true", "[1,2]")."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override '{item}': value is not valid YAML ({error})") from None
        _set_dotted(data, key, value)
    return data


def read_yaml(path: Path) -> dict:
    """The mapping stored in a YAML file (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: Path | str | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (defaults fill the rest)."""
    data = read_yaml(Path(path)) if path is not None else {}
    overrides = list(overrides)
    apply_overrides(data, overrides)
    where = str(path) if path is not None else "config"
    if overrides:
        where += " (with overrides)"
    return _build(cls, data, "", where)


def config_from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build ``cls`` from a plain nested dict (e.g. one saved inside a checkpoint)."""
    return _build(cls, data, "", where)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (Paths as strings, tuples as lists): the YAML-serialisable form."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Path) -> None:
    """Write the config as YAML (the file a run can be reproduced from)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
