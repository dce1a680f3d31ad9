"""Typed coercion of YAML and environment values into frozen settings dataclasses.

The machinery behind :mod:`broker.config`, kept apart so that module reads as the list of settings.
A settings dataclass declares each field's type; :func:`build` checks a YAML mapping against those
fields (unknown keys are errors), converts each value with :func:`coerce` — environment values are
strings, so they are parsed — and checks the bounds declared with :func:`bounded`. A field whose
metadata carries ``"parse"`` (a :data:`Parser`) is structured and converts itself.

Every error is a :class:`~broker.errors.ConfigError` whose message starts with the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from broker.errors import ConfigError

__all__ = ["Parser", "bounded", "build", "coerce", "field_names", "show", "suggest"]

Parser = Callable[[Any, str, Mapping[str, str]], Any]
"""A structured field's converter: ``(raw value, dotted key, environment) -> field value``."""


def bounded(default: Any = None, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose numeric value :func:`build` checks against inclusive/exclusive bounds."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def suggest(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (unknown key)"


def build(
    cls: type[Any],
    where: str,
    raw: Any,
    env: Mapping[str, str],
    overrides: Mapping[str, tuple[str, str]] | None = None,
) -> Any:
    """Instantiate the dataclass ``cls`` from a YAML mapping plus environment overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key{suggest(str(key), fields)}")
        values[key] = _field_value(fields[key], hints[key], value, f"{where}.{key}", env, from_env=False)
    for key, (text, var) in (overrides or {}).items():
        values[key] = _field_value(fields[key], hints[key], text, f"{where}.{key} ({var})", env, from_env=True)
    return cls(**values)


def _field_value(
    f: dataclasses.Field[Any], hint: Any, value: Any, key: str, env: Mapping[str, str], *, from_env: bool
) -> Any:
    parse: Parser | None = f.metadata.get("parse")
    if parse is not None:
        if from_env:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: invalid YAML/JSON: {exc}") from None
        return parse(value, key, env)
    result = coerce(value, hint, key, from_env)
    if isinstance(result, int | float) and not isinstance(result, bool):
        ge, gt, le = f.metadata.get("ge"), f.metadata.get("gt"), f.metadata.get("le")
        if ge is not None and result < ge:
            raise ConfigError(f"{key}: must be at least {ge}, got {result}")
        if gt is not None and result <= gt:
            raise ConfigError(f"{key}: must be greater than {gt}, got {result}")
        if le is not None and result > le:
            raise ConfigError(f"{key}: must be at most {le}, got {result}")
    return result


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(value: Any, hint: Any, key: str, from_env: bool) -> Any:
    """Convert one scalar or list to the type ``hint``; strings are parsed (env values are strings)."""
    origin = get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        if value is None or (from_env and value.strip() == ""):
            return None
        (inner,) = (a for a in get_args(hint) if a is not type(None))
        return coerce(value, inner, key, from_env)
    if origin is Literal:
        choices = get_args(hint)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {show(value)}")
    if origin is tuple:
        if isinstance(value, str):
            items: list[Any] = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a list of strings, got {show(value)}")
        return tuple(coerce(item, str, f"{key}[{i}]", from_env) for i, item in enumerate(items))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {show(value)}")
    if hint is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a number, got {show(value)}")
        return number
    if hint is str:
        # A password or a host may well be all digits; YAML then reads a number.
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {show(value)}")
    raise TypeError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover - a bug in this module


def show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
