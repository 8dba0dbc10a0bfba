"""Typed options read from YAML values: dataclasses built from mappings, values coerced by their
annotation, declared choices (``Literal``) and ranges checked, every error naming the key.

The one parser of config sections, model ``Params`` and edge-featurizer ``Params``. An option is
declared once, as a dataclass field: its annotation is its type (``Literal[...]`` for choices), and
:func:`option` puts its range and one-line doc in the field's metadata, from which :func:`describe`
writes the option lists of docstrings.

Dependencies run one way: this module (a leaf: it imports only ``errors`` and ``registry``) <- the
registries of models, featurizers, losses and optimisers <- ``config``. Nothing here or in those
registries imports ``config`` at run time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from .errors import CrystaltuneError
from .registry import did_you_mean


@dataclass(frozen=True)
class Range:
    """Closed interval ``[lo, hi]`` (``(lo, hi]`` when ``open_lo``); a missing bound is unbounded."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        return above and (self.hi is None or value <= self.hi)

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else self.lo
        hi = "inf" if self.hi is None else self.hi
        return f"{'(' if self.open_lo else '['}{lo}, {hi}]"


class UnknownKey(CrystaltuneError):
    """A key the dataclass has no field for (``key``, ``known``, ``hint``: the did-you-mean part)."""

    def __init__(self, where: str, key: object, known: list[str]):
        self.where, self.key, self.known = where, key, known
        self.hint = did_you_mean(str(key), known)
        super().__init__(f"{where}: unknown key {key!r}{self.hint} (known: {', '.join(known) or 'none'})")


class OutOfRange(CrystaltuneError):
    """A value outside its field's declared range (``where``: the key, ``bounds``: the range as text)."""

    def __init__(self, where: str, value: object, bounds: str):
        self.where, self.value, self.bounds = where, value, bounds
        super().__init__(f"{where}: must be in {bounds}, got {value}")


def option(default: Any = dataclasses.MISSING, *, lo=None, hi=None, open_lo: bool = False, doc: str = "", **kw):
    """A dataclass field declaring an option once: its default, range (``lo``/``hi``, ``open_lo`` for
    ``(lo, hi]``) and one-line ``doc``; the type is the field's annotation."""
    rng = Range(lo, hi, open_lo) if lo is not None or hi is not None else None
    return dataclasses.field(default=default, metadata={"range": rng, "doc": doc}, **kw)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


def build(cls: type, raw: Any, where: str):
    """A ``cls`` instance from ``raw`` (a YAML mapping, None for all defaults, or a ``cls`` instance to
    check again): unknown keys (with a did-you-mean), types, choices and ranges, naming the key."""
    if raw is None:
        raw = {}
    elif isinstance(raw, cls):
        raw = {f.name: getattr(raw, f.name) for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        raise CrystaltuneError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise UnknownKey(where, key, list(fields))
        kwargs[key] = _field_value(fields[key], hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _field_value(f: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    value = coerce(value, hint, where)
    rng = field_range(f)
    if rng is not None and value is not None and value not in rng:
        raise OutOfRange(where, value, f"{rng}{' (or null)' if _optional(hint) else ''}")
    return value


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (bool/int/float/str, Literal, Optional and
    other unions, list, dict): YAML gives loose types, and a wrong one should fail naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, where)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint_text = did_you_mean(value, args) if isinstance(value, str) else ""
        raise CrystaltuneError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            raise CrystaltuneError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise CrystaltuneError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(value, hint, where)


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    """The first member of the union that takes ``value``; else the first member's error."""
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return coerce(value, a, where)
        except CrystaltuneError as exc:
            errors.append(exc)
    raise errors[0]


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    """bool, int (integral floats too), float (ints too), str; anything else passes unchecked."""
    if hint is bool:
        if not isinstance(value, bool):
            raise CrystaltuneError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise CrystaltuneError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CrystaltuneError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise CrystaltuneError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def type_name(hint: Any) -> str:
    """An annotation as the docs write it: ``int``, ``"silu" | "softplus"``, ``int or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(_yaml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def describe(cls: type) -> list[str]:
    """One line per option of dataclass ``cls``, from its fields: name, type, range, default, doc."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        hint, rng, doc = hints[f.name], field_range(f), f.metadata.get("doc")
        optional = _optional(hint)
        if optional:
            hint = typing.Union[tuple(a for a in typing.get_args(hint) if a is not type(None))]  # noqa: UP007
        kind = type_name(hint) + (f" in {rng}" if rng is not None else "") + (" or null" if optional else "")
        default = "" if f.default is dataclasses.MISSING else f", default {_yaml(f.default)}"
        lines.append(f"``{f.name}`` ({kind}{default})" + (f": {doc}" if doc else ""))
    return lines


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def document(cls: type, params: type, section: str) -> None:
    """Append the generated option list of ``params`` (keys of ``section``) to ``cls.__doc__``."""
    lines = describe(params)
    if cls.__doc__ is None or not lines:
        return
    items = "".join(f"\n    - {line}" for line in lines)
    cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Options (``{section}``, :class:`{params.__name__}`):\n{items}\n"
