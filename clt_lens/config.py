"""Dataclass configs from YAML files plus ``--key value`` overrides, validated before any work.

Every command's config is a dataclass. ``load_config(Cls, path, overrides)`` reads a YAML
mapping, applies ``--key value`` overrides (dotted keys reach nested dataclasses), rejects
unknown keys by name, coerces values to the annotated field types, and finally calls the
dataclass's ``validate()`` if it has one.

A config class may declare ``renamed_keys`` (a ClassVar mapping an old spelling to the dotted
place of its field, e.g. ``{"d_sae": "clt.d_sae"}``): YAML files, overrides and saved
``train_config.json`` files written before a field moved keep working.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clt_lens.errors import CLTLensError

T = TypeVar("T")


class ConfigError(CLTLensError, ValueError):
    """A config is wrong; the message names the key and what is accepted."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build_config(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def upgrade_keys(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the old spellings ``cls.renamed_keys`` lists moved to their new places."""
    renames: Mapping[str, str] = getattr(cls, "renamed_keys", {})
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()
           if k not in renames}  # fmt: skip
    for old, value in data.items():
        if old not in renames:
            continue
        new = renames[old]
        node = out
        *parents, leaf = new.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{p}' must be a mapping, got {child!r}")
            node[p] = child = dict(child)
            node = child
        if leaf in node:
            raise ConfigError(
                f"config keys '{old}' and '{new}' both given: '{old}' is the old spelling of "
                f"'{new}'; keep one"
            )
        node[leaf] = value
    return out


def build_config(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    data = upgrade_keys(cls, data)
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"accepted: {sorted(prefix + k for k in types_)}"
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise ConfigError(f"missing config key(s) {[prefix + k for k in missing]} for "
                          f"{cls.__name__} (they have no default)")
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--data.seed=3"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    i = 0
    items = list(items)
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--"):
            raise ConfigError(f"override {tok!r} must look like --key value or --key=value")
        tok = tok[2:]
        if "=" in tok:
            key, raw = tok.split("=", 1)
            i += 1
        else:
            key = tok
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raw = "true"
                i += 1
            else:
                raw = items[i + 1]
                i += 2
        key = key.replace("-", "_")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> T:
    """YAML file (optional) + overrides -> validated dataclass ``cls``."""
    data = upgrade_keys(cls, read_yaml(path) if path is not None else {})
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return build_config(cls, _merge(data, upgrade_keys(cls, extra)))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a (possibly nested) dataclass config."""
    return dataclasses.asdict(cfg)
