"""Coercion of pipeline option text to a pass's dataclass field types, and numeric option bounds.

Supported annotations: int, float, bool (`true`/`false`), str, Literal[...],
tuple[X, ...] / list[X] (a bare scalar is a one-element sequence),
Optional[X] (a bare `none` is None), and Any (the raw text).

Every int or float option of a pass has `Bounds` in the pass's `option_bounds`,
checked when the pass is made (so a pipeline is refused before the slow
capture); the config layer checks its sections with the same bounds.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

_NONE_TYPE = type(None)


class QuotedStr(str):
    """A value that was written in quotes (so never read as `none`)."""


def type_name(hint: Any) -> str:
    """How an expected type reads in an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is _NONE_TYPE else type_name(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {type_name(args[0]) if args else 'str'}"
    if hint is bool:
        return "bool (true or false)"
    return getattr(hint, "__name__", str(hint))


def _coerce_scalar(value: str, hint: Any) -> Any:
    if hint is bool:
        if value.lower() not in ("true", "false"):
            raise ValueError
        return value.lower() == "true"
    if hint in (int, float):
        return hint(value)
    if hint is str or hint is Any:
        return str(value)
    raise TypeError(f"options of type {hint!r} are not supported")


def _coerce_literal(value: str, choices: tuple) -> Any:
    for choice in choices:
        if str(choice) == value or (isinstance(choice, bool) and value == str(choice).lower()):
            return choice
    raise ValueError


def _coerce_union(value: Any, members: tuple) -> Any:
    if _NONE_TYPE in members and value == "none" and not isinstance(value, QuotedStr):
        return None
    for member in (m for m in members if m is not _NONE_TYPE):
        try:
            return _coerce(value, member)
        except ValueError:
            continue
    raise ValueError


def _coerce_sequence(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    item = args[0] if args else str
    values = value if isinstance(value, list) else [value]
    items = [_coerce(v, item) for v in values]
    return tuple(items) if origin is tuple else items


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint))
    if origin in (tuple, list) or hint in (tuple, list):
        return _coerce_sequence(value, hint)
    if isinstance(value, list):
        if hint is Any:
            return value
        raise ValueError
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(hint))
    return _coerce_scalar(value, hint)


def coerce_option(value: Any, hint: Any) -> Any:
    """Raw parsed text (str or list of str) -> a value of type `hint`; ValueError names both."""
    try:
        return _coerce(value, hint)
    except ValueError:
        shown = "[" + ",".join(value) + "]" if isinstance(value, list) else value
        raise ValueError(f"expected {type_name(hint)}, got '{shown}'") from None


class OptionError(ValueError):
    """A pass option outside its accepted values; the message names the pass, the option and the range."""


@dataclass(frozen=True)
class Bounds:
    """Finite numbers in [low, high] (an end excluded where `*_open`), whole numbers only where `whole`;
    `noun` says what such a value is in messages ("a fraction", "a whole count")."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    noun: str = ""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and (not self.whole or float(value).is_integer())

    def describe(self) -> str:
        kind = self.noun or ("an integer" if self.whole else "a number" if self._bounded() else "a finite number")
        if math.isinf(self.low) and math.isinf(self.high):
            return kind
        if math.isinf(self.high):
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if math.isinf(self.low):
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def _bounded(self) -> bool:   # an interval with two finite ends already says the value is finite
        return math.isfinite(self.low) and math.isfinite(self.high)


OptionBounds = Union[Bounds, tuple[Bounds, ...]]   # a tuple: any one of them accepts


def bounds_problem(value: Any, bounds: OptionBounds) -> Optional[str]:
    """None when `value` lies within `bounds`, else what is accepted ("expected a number in (0, 1], got nan")."""
    choices = bounds if isinstance(bounds, tuple) else (bounds,)
    if any(b.accepts(value) for b in choices):
        return None
    return f"expected {' or '.join(b.describe() for b in choices)}, got {value!r}"


def check_bounds(options: Any, bounds: Mapping[str, OptionBounds], owner: str) -> None:
    """Raise OptionError naming `owner`, the option and its accepted range for the first value out of bounds."""
    for key, accepted in bounds.items():
        problem = bounds_problem(getattr(options, key), accepted)
        if problem:
            raise OptionError(f"{owner}: option '{key}': {problem}")


__all__ = ["Bounds", "OptionBounds", "OptionError", "QuotedStr", "bounds_problem", "check_bounds", "coerce_option",
           "type_name"]
