"""Coercion of pipeline option text to a pass's dataclass field types.

Supported annotations: int, float, bool (`true`/`false`), str, Literal[...],
tuple[X, ...] / list[X] (a bare scalar is a one-element sequence),
Optional[X] (a bare `none` is None), and Any (the raw text).
"""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

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


__all__ = ["QuotedStr", "coerce_option", "type_name"]
