"""Config classes as the one source of flags, config files and recipe steps.

A config is a dataclass whose attribute docstrings document its fields (compression) or a pydantic
settings model whose `Field(description=...)` does (`ServerSettings`, which also reads `SLIMSERVE_*`).
From either, `add_flags` derives the command-line flags (name, type, choices, help, default shown) and
`from_mapping` builds the config from a YAML mapping, rejecting unknown keys by name. A config with a
`choice_field` stands for one of several classes (`QuantizeConfig`: one per method): its flags are theirs
together, grouped by the choices that take them, and a mapping builds the class its choice picks, naming
any key that belongs to another choice.

Why a small generator over `dataclasses.fields` rather than jsonargparse or pydantic-settings' CLI: the
existing verbs keep flags those libraries would spell differently (`--variant` repeated into
`variants`, `--no-act-order`, `--keep` alone meaning "keep nothing", positional sources), the configs
stay plain dataclasses that tests and recipes build directly, and no dependency is added.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, recipe step or flag set that does not fit its config class."""


MISSING: Any = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class ConfigField:
    name: str
    type: Any
    default: Any
    """`MISSING` where the field is required."""
    help: str


def is_config(cls: Any) -> bool:
    return isinstance(cls, type) and (dataclasses.is_dataclass(cls) or hasattr(cls, "model_fields"))


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of a class body (what `--help` shows)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, [*body[1:], None], strict=True):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if documented and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                docs[node.target.id] = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
    return docs


def config_fields(cls: type) -> list[ConfigField]:
    """The fields of a dataclass or pydantic model, with resolved types, defaults and help."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        docs = attribute_docs(cls)
        found = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            found.append(ConfigField(f.name, hints[f.name], default, docs.get(f.name, "")))
        return found
    return [
        ConfigField(
            name,
            info.annotation,
            MISSING if info.is_required() else info.get_default(call_default_factory=True),
            " ".join((info.description or "").split()),
        )
        for name, info in cls.model_fields.items()  # type: ignore[attr-defined]
    ]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def choices(cls: type) -> dict[str, type] | None:
    """The classes a config that declares a `choice_field` stands for, by that field's value
    (`QuantizeConfig`: one class per method); None for a plain config (and for the choices themselves)."""
    return cls.choices() if "choice_field" in vars(cls) else None  # type: ignore[attr-defined]


def field_names(cls: type) -> set[str]:
    """Every key a mapping for `cls` may hold (for a config with choices: the keys of any choice)."""
    names = {f.name for f in config_fields(cls)}
    for member in (choices(cls) or {}).values():
        names |= {f.name for f in config_fields(member)}
    return names


def chosen_class(cls: type, data: Mapping[str, Any]) -> type:
    """The class `data` picks among `cls`'s choices (`cls` itself for a plain config). A key that belongs to
    another choice is an error naming it, as its flag, and the choice that was made."""
    options = choices(cls)
    if options is None:
        return cls
    tag = cls.choice_field  # type: ignore[attr-defined]
    if tag not in data:
        raise ConfigError(f"`{tag}` is required")
    value = data[tag]
    if value not in options:
        raise ConfigError(f"unknown {tag} {value!r}; choose one of {', '.join(sorted(options))}")
    chosen = options[value]
    names = {value: {f.name for f in config_fields(member)} for value, member in options.items()}
    for key in data:
        users = sorted(v for v, own in names.items() if key in own)
        if key not in names[value] and users:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to --{tag} {value} (only to {', '.join(users)})")
    return chosen


def from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls(**data)` with nested configs built from mappings; an unknown or missing key is a `ConfigError`
    naming it (the class's own checks then run as usual). A config with choices is built as the class that
    `data` picks (`chosen_class`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    cls = chosen_class(cls, data)
    fields = {f.name: f for f in config_fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    missing = [name for name, f in fields.items() if f.default is MISSING and name not in data]
    if missing:
        raise ConfigError(f"`{missing[0]}` is required")
    values = dict(data)
    for name, value in data.items():
        nested = _unwrap_optional(fields[name].type)
        if is_config(nested) and isinstance(value, Mapping):
            try:
                values[name] = from_mapping(nested, value)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of field names (dashes or underscores) to values; empty file: no values."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {file}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {file}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {file}: expected a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _help(field: ConfigField) -> str:
    text = field.help
    if field.default is True:
        text = f"{text} [default: on; this flag turns it off]"
    elif field.default not in (MISSING, None, False, [], ()) and not re.search(r"\[?default\b\s*[:`(]", text):
        text = f"{text} [default: {field.default}]".strip()
    return text.replace("%", "%%")  # argparse %-formats help


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    key: str,
    spelling: Mapping[str, Mapping[str, Any]] | None = None,
    prefix: str = "",
) -> None:
    """One flag per field of `cls` (nested configs flattened under their own field names; a config with
    choices also gets its choices' fields, grouped by the choices that take them).

    Parsed values land in the namespace as `<key>:<dotted field path>` and only when given (defaults stay
    with the config class). `spelling` overrides how a field's flag is written: `flag` (its name, e.g.
    `--variant`), `positional`, or any `add_argument` keyword (`action`, `nargs`, `choices`, `metavar`)."""
    spelling = spelling or {}
    for field in config_fields(cls):
        path = f"{prefix}{field.name}"
        tp = _unwrap_optional(field.type)
        if is_config(tp):
            add_flags(parser, tp, key, spelling, prefix=f"{path}.")
            continue
        _add_flag(parser, cls, field, f"{key}:{path}", spelling.get(field.name, {}))
    if choices(cls):
        _add_choice_flags(parser, cls, key, spelling)


def _add_choice_flags(
    parser: argparse.ArgumentParser, cls: type, key: str, spelling: Mapping[str, Mapping[str, Any]]
) -> None:
    """The fields of `cls`'s choices that `cls` lacks, one argument group per set of choices taking them; a
    default that differs between choices is shown per choice."""
    shared = {f.name for f in config_fields(cls)}
    uses: dict[str, list[tuple[str, ConfigField]]] = {}
    for value, member in (choices(cls) or {}).items():
        for field in config_fields(member):
            if field.name not in shared:
                uses.setdefault(field.name, []).append((value, field))
    groups: dict[tuple[str, ...], Any] = {}
    tag = cls.choice_field  # type: ignore[attr-defined]
    for name, found in uses.items():
        values = tuple(sorted(value for value, _ in found))
        field = found[0][1]
        if len({repr(f.default) for _, f in found}) > 1:
            per_choice = ", ".join(f"{f.default} for {value}" for value, f in found)
            field = dataclasses.replace(field, default=MISSING, help=f"{field.help} [default: {per_choice}]")
        if values not in groups:
            groups[values] = parser.add_argument_group(f"only with --{tag} {', '.join(values)}")
        _add_flag(groups[values], cls, field, f"{key}:{name}", spelling.get(name, {}))


def _add_flag(parser: Any, cls: type, field: ConfigField, dest: str, spelled: Mapping[str, Any]) -> None:
    """`field`'s flag, written as `spelled` says (see `add_flags`)."""
    tp = _unwrap_optional(field.type)
    custom = dict(spelled)
    if custom.pop("skip", False):
        return
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(field)}
    kwargs["metavar"] = field.name.upper()
    flag = custom.pop("flag", "--" + field.name.replace("_", "-"))
    if custom.pop("positional", False):
        kwargs = {"help": kwargs["help"], "default": None, "nargs": "?", "metavar": field.name}
        parser.add_argument(dest, **{**kwargs, **custom})
        return
    origin = typing.get_origin(tp)
    if tp is bool:
        if field.default is True:
            flag = custom.pop("flag", None) or f"--no-{field.name.replace('_', '-')}"
            kwargs["action"] = "store_false"
        else:
            kwargs["action"] = "store_true"
    elif origin is Literal:
        options = typing.get_args(tp)
        kwargs.update(type=type(options[0]), choices=options)
    elif origin is list:
        (item,) = typing.get_args(tp) or (str,)
        kwargs.update(type=item, nargs="+")
    elif tp in (int, float, str):
        kwargs["type"] = tp
    else:
        raise TypeError(f"{cls.__name__}.{field.name}: no flag for type {tp!r}")
    kwargs.update(custom)
    if kwargs.get("action") in ("store_true", "store_false"):
        kwargs.pop("type", None)
        kwargs.pop("metavar", None)
    if "choices" in kwargs:
        kwargs.pop("metavar", None)
    parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """The flags of config `key` that were given, as a (nested) mapping of field names. Flags that were
    not given are absent (their default is `SUPPRESS`); a positional that was not given is None."""
    found: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(f"{key}:") or value is None:
            continue
        *parents, last = dest.split(":", 1)[1].split(".")
        target = found
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    return found


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
