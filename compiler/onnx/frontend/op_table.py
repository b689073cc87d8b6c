"""The importer's op table: ONNX op type -> its torch code, the three op modules' tables combined here.

Each entry is fn(ctx, *inputs) -> output or tuple of outputs. `inputs` are torch
tensors (None for an omitted optional input); `ctx.attr(name, default)` reads an
attribute, `ctx.const(i)` the value of input i as Python numbers, which the
importer has folded at import time (shapes, axes, sizes) or fails naming the node,
and `ctx.axes(i)` an axes list given as input i or as an attribute (older opsets).
"""
from __future__ import annotations

from collections.abc import Callable

from .ops_math import MATH_OPS
from .ops_nn import NN_OPS
from .ops_shape import SHAPE_OPS


def _combine(*tables: dict[str, Callable]) -> dict[str, Callable]:
    """One table; an op type listed by two modules is an error, not a silent override."""
    combined: dict[str, Callable] = {}
    for table in tables:
        twice = sorted(set(combined) & set(table))
        if twice:
            raise ValueError(f"ONNX ops defined twice: {', '.join(twice)}")
        combined.update(table)
    return combined


OPS: dict[str, Callable] = _combine(MATH_OPS, SHAPE_OPS, NN_OPS)


def supported_ops() -> list[str]:
    return sorted(OPS)
