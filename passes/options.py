"""A pass's options: their types, accepted values and pipeline spelling, declared once on the pass class.

Supported annotations: int, float, bool (`true`/`false`), str, Literal[...],
tuple[X, ...] / list[X] (a bare scalar is a one-element sequence),
Optional[X] (a bare `none` is None), and Any (the raw text).

A pass is checked when it is made, whoever makes it (a pipeline string, the
sparsity config, a test), so a bad request is refused before the slow capture:
each value against its annotation (`value_problem`), then the pass's own
`options_problem` (an `OptionProblem`: choices, combinations), then every int
or float option against its `Bounds` or `OneOf` in the pass's `option_bounds`.
An `OptionError` names the option, so the config layer can name its own key.
"""
from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, NamedTuple, Optional, Union

_NONE_TYPE = type(None)
# an option value the pipeline grammar reads without quotes
BARE_VALUE = re.compile(r"[A-Za-z0-9.*:/\-_+]+")


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


def _format_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    text = repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str) and (not BARE_VALUE.fullmatch(text) or text == "none"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_option(value: Any) -> str:
    """The pipeline spelling of an option value (the inverse of parsing plus coercion)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_scalar(v) for v in value) + "]"
    return _format_scalar(value)


# how a value check names a scalar type ("expected an integer, got 4.0"); others read as in `type_name`
_VALUE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, member) for member in args)
    if origin is Literal:   # `type(...) is` keeps True from passing for 1
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin in (tuple, list) or hint in (tuple, list):
        item = args[0] if args else str
        return isinstance(value, (tuple, list)) and all(_has_type(v, item) for v in value)
    if hint is _NONE_TYPE:
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return hint is Any or not isinstance(hint, type) or isinstance(value, hint)


def value_problem(value: Any, hint: Any) -> Optional[str]:
    """None when `value` is of the annotated type `hint` (an int is a float too), else what was expected."""
    if _has_type(value, hint):
        return None
    return f"expected {_VALUE_NAMES.get(hint) or type_name(hint)}, got {value!r}"


class OptionProblem(NamedTuple):
    """What a pass's `options_problem` finds: the option at fault and a sentence saying why."""
    option: str
    text: str


class OptionError(ValueError):
    """A pass option outside its accepted values; the message names the pass, the option and what is accepted.
    `option` and `problem` are the parts without the pass, for callers that name the option their own way."""

    def __init__(self, message: str, option: str, problem: str):
        super().__init__(message)
        self.option, self.problem = option, problem


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


@dataclass(frozen=True)
class OneOf:
    """Exactly one of `choices` (numbers), for an option whose valid values are a short list."""
    choices: tuple

    def __init__(self, *choices: Any):
        object.__setattr__(self, "choices", choices)

    def accepts(self, value: Any) -> bool:
        return not isinstance(value, bool) and value in self.choices

    def describe(self) -> str:
        return " or ".join(str(c) for c in self.choices)


OptionBounds = Union[Bounds, OneOf, tuple[Bounds, ...]]   # a tuple: any one of them accepts


def bounds_problem(value: Any, bounds: OptionBounds) -> Optional[str]:
    """None when `value` lies within `bounds`, else what is accepted ("expected a number in (0, 1], got nan")."""
    choices = bounds if isinstance(bounds, tuple) else (bounds,)
    if any(b.accepts(value) for b in choices):
        return None
    return f"expected {' or '.join(b.describe() for b in choices)}, got {value!r}"


def check_types(options: Any, hints: Mapping[str, Any], owner: str) -> None:
    """Raise OptionError naming `owner` and the option for the first value not of its annotated type."""
    for key, hint in hints.items():
        problem = value_problem(getattr(options, key), hint)
        if problem:
            raise OptionError(f"{owner}: option '{key}': {problem}", key, problem)


def check_bounds(options: Any, bounds: Mapping[str, OptionBounds], owner: str) -> None:
    """Raise OptionError naming `owner`, the option and its accepted range for the first value out of bounds."""
    for key, accepted in bounds.items():
        problem = bounds_problem(getattr(options, key), accepted)
        if problem:
            raise OptionError(f"{owner}: option '{key}': {problem}", key, problem)


__all__ = ["BARE_VALUE", "Bounds", "OneOf", "OptionBounds", "OptionError", "OptionProblem", "QuotedStr",
           "bounds_problem", "check_bounds", "check_types", "coerce_option", "format_option", "type_name",
           "value_problem"]
