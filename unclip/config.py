"""Typed, strict configuration: frozen dataclasses loaded from YAML or dicts.

Every component's config is a frozen dataclass with a comment per field. `load_config(Cls, "x.yaml")`
builds it from a YAML file and rejects anything that does not fit: an unknown key is an error that names
the key, where it is, the closest valid key and the full list; a value of the wrong type or outside a
`Literal` is an error that names the field and what was expected. A field typed `Annotated[T, check]` is read
as T, then `check(value, where)` may raise a ConfigError for what the type cannot say (e.g. the keys of a
free-form mapping checked against a library's own dataclass).

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = 1e-4                    # peak learning rate
        schedule: Literal["cosine", "constant"] = "cosine"

    cfg = load_config(OptimConfig, {"lr": 3e-4})
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "UnknownKeyError", "load_config", "config_from_dict", "config_to_dict", "replace_config",
           "check_keys"]


class ConfigError(ValueError):
    """A config that does not fit its dataclass: unknown key, missing field, wrong type or value."""


class UnknownKeyError(ConfigError):
    """A config key its dataclass does not have (a typo, or a file meant for another config)."""


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | T) -> T:
    """Build the dataclass `cls` from a YAML file path, a mapping, or return an existing instance."""
    if isinstance(source, cls):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with path.open() as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
        try:
            return config_from_dict(cls, data)
        except ConfigError as e:
            raise type(e)(f"{path}: {e}") from None  # the same kind (UnknownKeyError, ...)
    return config_from_dict(cls, source)


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Strictly convert a (nested) mapping into the frozen dataclass `cls`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, list(fields), where, cls.__name__)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(where, name)}' for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def check_keys(data: Mapping[str, Any], valid: list[str], where: str, owner: str) -> None:
    """Raise ConfigError for the first key of `data` not in `valid`, naming its path (under `where`), `owner` (what
    takes these keys), the closest valid key and all of them."""
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UnknownKeyError(
                f"unknown config key '{_join(where, key)}' for {owner}.{hint} Valid keys: {', '.join(valid)}"
            )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data (JSON/YAML-ready) form of a config dataclass; tuples become lists."""
    return _plain(dataclasses.asdict(cfg))


def replace_config(cfg: T, overrides: Mapping[str, Any]) -> T:
    """A copy of `cfg` with dotted-key overrides (`{"train.lr": 1e-3}`), validated like a loaded file."""
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                sections = [k for k, v in node.items() if v is None or isinstance(v, dict)]
                close = difflib.get_close_matches(p, sections, n=1)
                hint = f" Did you mean '{close[0]}'?" if close and p not in node else ""
                raise UnknownKeyError(f"unknown config key '{dotted}': '{p}' is not a section.{hint}")
            node = node[p]
        node[leaf] = value
    return config_from_dict(type(cfg), data)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:  # Annotated[T, check, ...]: convert to T, then each check(value, where) may raise
        inner, *checks = get_args(tp)
        value = _convert(inner, value, where)
        for check in checks:
            if callable(check):
                check(value, where)
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if len(options) == 2 and type(None) in options:  # Optional[T]: T's own error says more than "fits none"
            return _convert(next(o for o in options if o is not type(None)), value, where)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list for {_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items for {_name(tp)}, got {len(value)}")
            items = [_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept numeric strings for floats only.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot read {value!r} as {_name(tp)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
