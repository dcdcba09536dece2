"""YAML data to typed dataclasses, strictly: the machinery under :mod:`common.config`.

:func:`build` turns plain data (parsed YAML) into a dataclass, field by field: an unknown key, a
value of the wrong type or out of its range raises :class:`ConfigError` naming the dotted key
path. A field's range and one-line description ride in its metadata (:func:`field_`).
``key.path=value`` overrides are parsed by :func:`parse_override` (the value is YAML) and set in
plain data by :func:`set_path`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message names the file and key path."""


def field_(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
           doc: str = "", factory: Any = None) -> Any:
    """A dataclass field with an inclusive numeric range and a one-line description."""
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        null = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_describe(a) for a in args) + null
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name to {_describe(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp))


def _check_range(value: Any, meta: typing.Mapping, where: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: expected a value >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: expected a value <= {hi}, got {value!r}")


def build(tp: Any, value: Any, where: str, meta: typing.Mapping, base: Any = None) -> Any:
    """Convert plain YAML data ``value`` to type ``tp``; raise ConfigError naming ``where``.

    A section given in part keeps the defaults of its other keys, taken from ``base`` (the
    parent's default for that field, so ``model.student`` keeps the *student's* defaults)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (valid keys: "
                              f"{', '.join(fields)})".lstrip("."))
        base = base if base is not None else tp()
        kwargs = {}
        for name, val in value.items():
            sub = f"{where}.{name}" if where else name
            kwargs[name] = build(hints[name], val, sub, fields[name].metadata,
                                  getattr(base, name))
        return dataclasses.replace(base, **kwargs)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:   # the first type that takes the value (str | list[str])
            try:
                return build(arg, value, where, meta, base)
            except ConfigError:
                pass
        try:
            return build(args[-1], value, where, meta, base)
        except ConfigError:
            if len(args) == 1:
                raise
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}") from None
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [build(item_tp, v, f"{where}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): build(val_tp, v, f"{where}.{k}", meta) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        _check_range(value, meta, where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        _check_range(float(value), meta, where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")  # programming error


def build_section(tp: type, data: dict[str, Any], where: str) -> Any:
    """Build and validate one section dataclass (e.g. TrainConfig) from plain data; errors
    name ``where.key``."""
    return build(tp, data, where, {})


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML (``[96,96]``, ``true``, ``0.5``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value
