"""Typed dataclasses from plain data (YAML or JSON): one validator for recipes, options and artifact files.

A schema is a dataclass whose field types say what is allowed:

    @dataclass
    class BenchOptions:
        tower: Literal["image", "text", "both"] = "both"
        iters: Annotated[int, Range(1, None)] = 20
        threads: Annotated[int, Range(1, None)] | None = None

``from_dict(BenchOptions, data, label="bench option")`` returns an instance or raises ``UserError`` with
one line naming the dotted key, what was expected and what was given (unknown keys suggest the closest
valid key). Numbers are finite unless a ``Range`` says otherwise; booleans are never numbers.
Strings may carry a ``Pattern`` (a full-match regular expression and what it means in words).
Cross-field rules belong in the dataclass's ``validate_fields(self, path)`` method, which ``from_dict`` calls.
``validate(obj)`` checks a dataclass instance built in Python (constructors check nothing) the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union

from .errors import UserError, closest

__all__ = ["Range", "Pattern", "from_dict", "validate", "check_value", "describe_type", "Annotated", "Literal"]


@dataclass(frozen=True)
class Range:
    """Closed (default) or open bounds of a number; None means unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"


POSITIVE_INT = Annotated[int, Range(1, None)]  # a count or size, >= 1


def join_key(path: str, key: str) -> str:
    """`path.key`, or `key` at the top level: the dotted key an error message names."""
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class Pattern:
    """A string that must match ``regex`` in full; ``meaning`` says what that is, for error messages."""

    regex: str
    meaning: str

    def matches(self, v: str) -> bool:
        return re.fullmatch(self.regex, v) is not None

    def describe(self) -> str:
        return self.meaning


def describe_type(tp: Any) -> str:
    """A short human description of a field type, for error messages and docs."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        rng = next((m for m in meta if isinstance(m, Range)), None)
        pat = next((m for m in meta if isinstance(m, Pattern)), None)
        if pat:
            return pat.describe()
        return f"{describe_type(base)} {rng.describe()}" if rng else describe_type(base)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(describe_type(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(tp)) else text
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {describe_type(item)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "anything")


def _q(path: str) -> str:
    """A key path quoted for a one-line message (repr when it holds a newline or another control character)."""
    return f"'{path}'" if path.isprintable() else repr(path)


def _fail(label: str, path: str, expected: str, value: Any) -> UserError:
    return UserError(f"{label} {_q(path)} must be {expected}, got {value!r}")


def _same_kind(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the Python kind that ``tp`` takes (number, string, mapping, list, bool)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _same_kind(value, typing.get_args(tp)[0])
    if origin is Literal:
        return any(_same_kind(value, type(c)) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_same_kind(value, a) for a in typing.get_args(tp))
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return False


def check_value(value: Any, tp: Any, path: str, label: str = "value") -> Any:
    """``value`` coerced to ``tp`` (int-valued floats to int, numeric strings to float), or a UserError."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _check_annotated(value, tp, path, label)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:  # True == 1 must not pass for Literal[1]
            names = [str(c) for c in choices]
            hint = closest(str(value), names) if isinstance(value, str) else ""
            raise UserError(f"{label} {_q(path)} must be one of {', '.join(names)}, got {value!r}{hint}")
        return value
    if origin in (Union, types.UnionType):
        return _check_union(value, tp, path, label)
    if dataclasses.is_dataclass(tp) or origin in (list, dict) or tp is dict:
        return _check_container(value, tp, origin, path, label)
    if tp is Any:
        return value
    if value is None:
        raise _fail(label, path, describe_type(tp), value)
    if tp in (bool, int, float, str):
        return _check_scalar(value, tp, path, label)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _fail(label, path, describe_type(tp), value)
    return value


def _check_annotated(value: Any, tp: Any, path: str, label: str) -> Any:
    base, *meta = typing.get_args(tp)
    out = check_value(value, base, path, label)
    for m in meta:
        if isinstance(m, Range) and out is not None and not m.contains(out):
            raise _fail(label, path, f"{describe_type(base)} {m.describe()}", value)
        if isinstance(m, Pattern) and out is not None and not m.matches(out):
            raise _fail(label, path, m.describe(), value)
    return out


def _check_union(value: Any, tp: Any, path: str, label: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _fail(label, path, describe_type(tp), value)
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return check_value(value, a, path, label)
        except UserError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    # the one branch of the value's own kind (a number for `ratio | mapping`) says what is wrong best
    same_kind = [e for a, e in zip([a for a in args if a is not type(None)], errors) if _same_kind(value, a)]
    if len(same_kind) == 1:
        raise same_kind[0]
    raise _fail(label, path, describe_type(tp), value)


def _check_container(value: Any, tp: Any, origin: Any, path: str, label: str) -> Any:
    """A dataclass (from a mapping), a list or a mapping, item by item."""
    if origin is list:
        if not isinstance(value, list):
            raise _fail(label, path, describe_type(tp), value)
        (item,) = typing.get_args(tp) or (Any,)
        return [check_value(v, item, f"{path}.{i}", label) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise _fail(label, path, "a mapping", value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, label)
    if tp is dict:
        return value
    kt, vt = typing.get_args(tp) or (Any, Any)
    return {
        check_value(k, kt, f"{path}.{k}", label): check_value(v, vt, f"{path}.{k}", label) for k, v in value.items()
    }


def _check_scalar(value: Any, tp: type, path: str, label: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(label, path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(label, path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _fail(label, path, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(label, path, "a number", value)
        try:
            value = float(value)  # an int beyond float's range overflows: not a finite number either
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise _fail(label, path, "a finite number", value)
        return value
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # str
        raise _fail(label, path, "a string", value)
    return str(value)


def from_dict(
    cls: type, data: dict[str, Any], path: str = "", label: str = "key", key_format: Callable[[str], str] | None = None
) -> Any:
    """An instance of dataclass ``cls`` built from ``data``; every field checked against its type.

    ``key_format`` spells a top-level key in messages (the CLI passes ``--calib-count`` for ``calib_count``).
    """
    if not isinstance(data, dict):
        raise _fail(label, path or cls.__name__, "a mapping", data)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key_format(str(key)) if key_format else str(key)
        if key not in names:
            raise UserError(
                f"unknown {label} {_q(full)}{closest(str(key), names)}; valid keys here: {', '.join(names)}"
            )
        kwargs[key] = check_value(value, hints[key], full, label)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [
            f.name
            for f in fields
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        where = f" in {_q(path)}" if path else ""
        raise UserError(f"missing {label} '{missing[0] if missing else e}'{where}") from None
    validate = getattr(obj, "validate_fields", None)
    if callable(validate):
        validate(path)
    return obj


def validate(
    obj: Any, cls: type | None = None, label: str = "key", key_format: Callable[[str], str] | None = None
) -> Any:
    """A checked copy of dataclass instance ``obj`` (as ``cls``, default its own class: a subclass instance
    checked as its base keeps only the base's fields). Tuples become lists, so ``batches=(1, 8)`` passes, and
    paths strings."""
    cls = cls or type(obj)
    data = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(cls) if f.init}
    return from_dict(cls, data, "", label, key_format)


def _plain(v: Any) -> Any:
    if isinstance(v, PurePath):  # a path option is a string in files; the API may hand over a Path
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
