"""Typed dataclass configs: YAML files plus ``--set key=value`` overrides, checked against the field types.

``load_config(TrainConfig, path, ["optim.lr=1e-3", "model.sge=false"])`` reads the YAML file, applies the
overrides (values parsed as YAML scalars), and builds the nested dataclasses; an unknown key or a value of the
wrong type raises ``ConfigError`` naming the dotted key and the file. Each dataclass checks its ranges in
``__post_init__`` with ``require``; a value out of range is reported with its dotted key, the value and the
allowed range. A key renamed since is still read under its old name (the section's ``upgrade_keys``), with a
``FutureWarning`` naming the new one when it comes from a file or an override.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from xmcl.errors import ConfigError

T = TypeVar("T")

SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # the YAML configs installed with the package
BASE_KEY = "base"  # a config file's key naming the file it overlays


class FieldRangeError(ConfigError):
    """A config field holds a value outside its allowed range (raised by ``require``)."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"'{name}' = {value!r} is out of range: must be {allowed}")

    def at(self, prefix: str, where: str) -> ConfigError:
        """The same error with the field's dotted key under ``prefix`` and the config's origin ``where``."""
        key = f"{prefix}.{self.name}" if prefix else self.name
        return ConfigError(f"{where}: '{key}' = {self.value!r} is out of range: must be {self.allowed}")


def _bounds_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else ""
    high = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else ""
    return " and ".join(part for part in (low, high) if part)


def require(cfg: Any, name: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> None:
    """Raise ``FieldRangeError`` unless ``cfg.name`` (a number, each item of a list, or None = unset) is finite and
    lies in the range ``ge <= x``, ``gt < x``, ``x <= le``, ``x < lt`` (bounds left None are open)."""
    value = getattr(cfg, name)
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if item is None:
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise FieldRangeError(name, value, " and ".join(filter(None, ["finite", _bounds_text(ge, gt, le, lt)])))
        if ((ge is not None and not item >= ge) or (gt is not None and not item > gt)
                or (le is not None and not item <= le) or (lt is not None and not item < lt)):
            raise FieldRangeError(name, value, _bounds_text(ge, gt, le, lt))


# The ranges every optimiser section shares, checked by ``require_optimiser`` for the fields a section has.
OPTIMISER_RANGES: dict[str, dict[str, float]] = {
    "lr": {"gt": 0.0, "le": 10.0}, "weight_decay": {"ge": 0.0, "le": 1.0}, "momentum": {"ge": 0.0, "lt": 1.0},
    "dampening": {"ge": 0.0, "lt": 1.0}, "grad_clip": {"gt": 0.0}, "epochs": {"ge": 1}, "steps": {"ge": 1},
    "batch_size": {"ge": 2}}


def require_optimiser(cfg: Any) -> None:
    """``require`` each field of ``OPTIMISER_RANGES`` that the optimiser section ``cfg`` has, in its range."""
    for name, bounds in OPTIMISER_RANGES.items():
        if hasattr(cfg, name):
            require(cfg, name, **bounds)


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


def rename_keys(data: dict, renamed: dict[str, str]) -> list[tuple[str, str]]:
    """Move each old key of ``renamed`` present in the section ``data`` to its new name (in place); returns the
    ``(old, new)`` pairs moved. A section that sets both names is refused, naming them."""
    moved = []
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ConfigError(f"'{old}' and '{new}' are both set; '{old}' is the old name of '{new}': keep one")
            data[new] = data.pop(old)
            moved.append((old, new))
    return moved


def _upgraded(cls: type, data: dict, prefix: str, notes: list[str]) -> dict:
    """A copy of ``data`` with the keys that ``cls`` (and its nested sections) renamed since under their names now:
    a section class lists them in a static ``upgrade_keys(data) -> [(old, new), ...]`` that edits ``data`` in
    place. Each move adds a note ("'loss.lambda_batch' is now 'loss.batch_weight'") to ``notes``."""
    data = dict(data)
    upgrade = getattr(cls, "upgrade_keys", None)
    if upgrade is not None:
        try:
            moved = upgrade(data)
        except ConfigError as error:
            raise ConfigError(f"section '{prefix.rstrip('.')}': {error}" if prefix else str(error)) from None
        notes.extend(f"'{prefix}{old}' is now '{prefix}{new}'" for old, new in moved)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if isinstance(data.get(f.name), dict) and dataclasses.is_dataclass(hints[f.name]):
            data[f.name] = _upgraded(hints[f.name], data[f.name], f"{prefix}{f.name}.", notes)
    return data


def _build(cls: type[T], data: dict, prefix: str, where: str) -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = ", ".join(f"'{prefix}.{k}'" if prefix else f"'{k}'" for k in unknown)
        raise ConfigError(f"{where}: unknown key {full}; {cls.__name__} has {sorted(names)}")
    kwargs = {}
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in defaults and dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            value = _merged(dataclasses.asdict(defaults[name]()), value)  # a partial section keeps this default
        kwargs[name] = _coerce(value, hints[name], key, where)
    try:
        return cls(**kwargs)
    except FieldRangeError as error:
        raise error.at(prefix, where) from None
    except ConfigError as error:  # a rule across fields of the section
        raise ConfigError(f"{where}: {prefix + ': ' if prefix else ''}{error}") from None


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update`` written over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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


def find_config(path: Path | str) -> Path:
    """``path`` when it exists; else the shipped config of that name (``shapes_user``, ``shapes_user.yaml`` or
    ``configs/shapes_user.yaml`` all name ``SHIPPED_CONFIGS / "shapes_user.yaml"``), so commands work from any
    folder; any other path is taken as it is (reading it then reports that it does not exist)."""
    path = Path(path)
    if path.exists() or path.parent not in (Path("."), Path("configs")):
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys += _leaf_keys(value, dotted) if isinstance(value, dict) and value else [dotted]
    return keys


def read_composed(path: Path, chain: tuple[Path, ...] = (), upgrade: Callable[[dict], dict] | None = None
                  ) -> tuple[dict, dict[str, Path]]:
    """The mapping of the config file ``path`` composed with its ``base:`` chain, and the file that set each leaf key
    (dotted). ``base: NAME_OR_PATH`` (a path relative to this file's folder, or a shipped config's name) is read
    first, composed the same way, and this file's keys are written over it (sections merged key by key, lists
    replaced whole). A chain that comes back to a file is refused, naming the chain. ``upgrade`` turns each file's
    mapping into today's key names before it is composed."""
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if upgrade is not None:
        try:
            data = upgrade(data)
        except ConfigError as error:
            raise ConfigError(f"config file {path}: {error}") from None
    origins = dict.fromkeys(_leaf_keys(data), path)
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: '{BASE_KEY}' must name a config file, got {base!r}")
    beside = path.parent / base
    base_path = beside if beside.is_file() else find_config(base)
    here = (*chain, path.resolve())
    if base_path.resolve() in here:
        loop = " -> ".join(str(p) for p in (*here, base_path.resolve()))
        raise ConfigError(f"config file {path}: its '{BASE_KEY}' chain comes back to a file: {loop}")
    base_data, base_origins = read_composed(base_path, here, upgrade)
    return _merged(base_data, data), {**base_origins, **origins}


def compose(*paths: Path | str) -> dict:
    """The mapping of the config files ``paths`` in turn (each found by ``find_config`` and composed with its ``base:``
    chain by ``read_composed``), each written over the ones before it (sections merged key by key, lists replaced
    whole): a config with overlays on it, e.g. a data config and one of the shipped ``configs/variants/``."""
    data: dict = {}
    for path in paths:
        data = _merged(data, read_composed(find_config(path))[0])
    return data


def _naming_the_file(error: ConfigError, origins: dict[str, Path], where: str) -> ConfigError:
    """``error`` with ``where`` replaced by the file that set the key it names, when a base file set it."""
    found = re.search(r"'([A-Za-z0-9_.]+)", str(error))
    origin = origins.get(found.group(1)) if found else None
    if origin is None or str(error).split(":", 1)[0] == str(origin):
        return error
    return ConfigError(str(error).replace(where, f"{origin} (the base of {where})", 1))


def load_config(cls: type[T], path: Path | str | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file (see ``find_config``; its ``base:`` chain composed by
    ``read_composed``) and ``key=value`` overrides (defaults fill the rest). An error names the file that set the
    key it is about."""
    if path is not None:
        path = find_config(path)
    notes: list[str] = []

    def upgrade(layer: dict) -> dict:
        return _upgraded(cls, layer, "", notes)

    data, origins = read_composed(path, upgrade=upgrade) if path is not None else ({}, {})
    overrides = list(overrides)
    overridden = upgrade(apply_overrides({}, overrides))
    data = _merged(data, overridden)
    where = str(path) if path is not None else "config"
    if overrides:
        where += " (with overrides)"
        origins = {key: origin for key, origin in origins.items() if key not in set(_leaf_keys(overridden))}
    for note in dict.fromkeys(notes):
        warnings.warn(f"{where}: {note}; the old name is still read, but rename it", FutureWarning, stacklevel=2)
    try:
        return _build(cls, data, "", where)
    except ConfigError as error:
        raise _naming_the_file(error, origins, where) from None


def current_names(cls: type, data: dict) -> dict:
    """A copy of ``data`` (a plain nested mapping of ``cls``: saved in a checkpoint or kept in a results file) with
    the keys renamed since under their names now; keys added since stay absent."""
    return _upgraded(cls, data, "", [])


def config_from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build ``cls`` from a plain nested dict (e.g. one saved inside a checkpoint), keys renamed since read under
    their names now."""
    try:
        upgraded = current_names(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return _build(cls, upgraded, "", where)


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
