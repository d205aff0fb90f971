"""Command-line options generated from a dataclass config, with ``--help`` that documents them.

Every ``clt-lens`` command is ``clt-lens CMD [CONFIG.yaml] [--field value ...]``: the fields of
its config dataclass (nested ones with dotted names, ``--source.model``) become options, each
listed by ``--help`` with its type, default and the comment written next to the field in the
dataclass. Values go through :func:`clt_lens.config.load_config`, so YAML files and options
are checked the same way (unknown keys and bad types refused by name).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clt_lens.config import ConfigError, load_config

T = TypeVar("T")
_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, or the comment lines right above it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__.startswith("sae_lens"):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            text = tok.string.lstrip("#").strip()
            if tok.type == tokenize.COMMENT and not text.startswith(("---", "fmt:", "noqa")):
                comments[tok.start[0]] = text
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = node.lineno
                doc = comments.get(line) if not lines[line - 1].lstrip().startswith("#") else None
                if doc is None:
                    above, n = [], line - 1
                    while n in comments and lines[n - 1].lstrip().startswith("#"):
                        above.insert(0, comments[n])
                        n -= 1
                    doc = " ".join(above) or None
                if doc:
                    docs[node.target.id] = doc
    return docs


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join("none" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, Sequence):
        return f"list[{type_name(args[0]) if args else 'any'}]"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is bool:
        return "true|false"
    return getattr(tp, "__name__", str(tp))


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, doc) of every settable field, nested ones included."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield prefix + f.name, tp, default, docs.get(f.name, "")


def _fmt_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         aliases: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """One ``--field`` option per (nested) field of ``cls``; ``aliases`` (default: the class's
    ``renamed_keys``) maps an old spelling to a field: it keeps working, unlisted in --help."""
    if aliases is None:
        aliases = getattr(cls, "renamed_keys", {})
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in CONFIG.yaml)")
    for name, tp, default, doc in iter_fields(cls):
        help_ = f"{doc} " if doc else ""
        help_ += f"[{type_name(tp)}; default {_fmt_default(default)}]"
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="V",
                           nargs="?", const="true", help=help_.replace("%", "%%"))  # fmt: skip
    for old, new in aliases.items():
        flags = [f"--{old}"] + ([f"--{old.replace('_', '-')}"] if "_" in old else [])
        group.add_argument(*flags, dest=new, default=argparse.SUPPRESS, metavar="V",
                           nargs="?", const="true", help=argparse.SUPPRESS)  # fmt: skip


def config_from_args(cls: type[T], args: argparse.Namespace, config: str | Path | None,
                     extra: Mapping[str, Any] | None = None) -> T:  # fmt: skip
    """The config: YAML file ``config`` (optional), then the options given, then ``extra``."""
    overrides: dict[str, Any] = {}
    for name, tp, *_ in iter_fields(cls):
        if hasattr(args, name):
            node = overrides
            *parents, leaf = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            raw = getattr(args, name)
            node[leaf] = _option_value(raw, tp) if isinstance(raw, str) else raw
    for key, value in (extra or {}).items():
        overrides.setdefault(key, value)
    return load_config(cls, config, overrides)


def _option_value(raw: str, tp: Any) -> Any:
    """An option's word as the field's value. Text fields take it as written (a prompt such as
    ``ROMEO: But soft`` is not a YAML mapping, a leading space is kept); list fields split on
    commas (``--features 1:4`` is not YAML's base-60 integer); the rest is read as YAML."""
    args = set(typing.get_args(tp))
    text_like = tp is str or (args == {str, type(None)})
    if text_like:
        return None if (type(None) in args and raw in ("null", "none", "None", "~")) else raw
    origin = typing.get_origin(tp)
    listy = origin in (list, tuple, Sequence) or any(
        typing.get_origin(a) in (list, tuple, Sequence) for a in args
    )
    if listy and not raw.lstrip().startswith("["):
        return None if (type(None) in args and raw in ("null", "none", "None", "~")) else raw
    return _yaml_value(raw)


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def split_config_path(positional: Sequence[str]) -> tuple[str | None, list[str]]:
    """(YAML file, other positional words): the first word ending in .yaml/.yml is the file."""
    config, rest = None, []
    for word in positional:
        if config is None and word.endswith((".yaml", ".yml")):
            config = word
        else:
            rest.append(word)
    return config, rest


def add_positionals(parser: argparse.ArgumentParser, *names: str, help: str = "") -> None:
    """``[CONFIG.yaml] NAME ...``: positional words; NAMEs are fields, settable as --NAME too."""
    metavar = " ".join(["[CONFIG.yaml]", *(n.upper() for n in names)])
    help = help or "CONFIG.yaml: optional YAML file of the fields below" + "".join(
        f"; then {n.upper()} (same as --{n})" for n in names
    )
    parser.add_argument("words", nargs="*", metavar=metavar, help=help)


def command_config(cls: type[T], args: argparse.Namespace, extra: Sequence[str], command: str,
                   positionals: Sequence[str] = (), config: str | None = None) -> T:  # fmt: skip
    """The command's config from its positional words and options. Words argparse left over
    after an option (``--tokens 5 CHECKPOINT``) still count as positionals; a field given both
    ways, unknown options and extra words are refused by name."""
    swallowed = []
    for name, tp, *_ in iter_fields(cls):
        raw = getattr(args, name, None)
        # a switch takes an optional value, so `--read-only DIR` hands it DIR: a word that is
        # not true/false is the next positional, and the switch is on
        if tp is bool and isinstance(raw, str) and raw.lower() not in _BOOL_WORDS:
            setattr(args, name, "true")
            swallowed.append(raw)
    words = [*getattr(args, "words", []), *swallowed, *(w for w in extra if not w.startswith("-"))]
    reject_unknown([w for w in extra if w.startswith("-")], command)
    yaml_path, rest = split_config_path(words)
    if config is not None:
        if yaml_path is not None:
            raise ConfigError(f"two config files: {config!r} and {yaml_path!r}; give one")
        yaml_path = config
    if len(rest) > len(positionals):
        raise ConfigError(
            f"too many positional arguments {rest}: 'clt-lens {command}' takes "
            + (" ".join(n.upper() for n in positionals) or "none")
            + " after an optional CONFIG.yaml"
        )
    given = dict(zip(positionals, rest))
    if yaml_path is None:
        required = {name for name, _, default, _ in iter_fields(cls)
                    if default is dataclasses.MISSING}  # fmt: skip
        absent = [n for n in positionals if n in required and n not in given
                  and not hasattr(args, n)]  # fmt: skip
        if absent:
            raise ConfigError(
                f"'clt-lens {command}' needs " + " ".join(n.upper() for n in absent)
                + " (or " + ", ".join(f"--{n}" for n in absent) + ")"
            )
    for name in given:
        if hasattr(args, name):
            raise ConfigError(f"{name} given twice: as {name.upper()} and as --{name}; keep one")
    return config_from_args(cls, args, yaml_path, given)


def reject_unknown(unknown: Sequence[str], command: str) -> None:
    """Refuse options no field has (argparse would otherwise pass them through silently)."""
    if unknown:
        raise ConfigError(
            f"unknown option(s) {list(unknown)}; 'clt-lens {command} --help' lists every field"
        )
