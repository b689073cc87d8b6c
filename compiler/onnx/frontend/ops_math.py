"""ONNX operators as torch code (ATen ops under torch.export), part 1: elementwise math,
comparisons, reductions, softmax, casts, TopK. The calling convention is in `op_table`.

Broadcasting, integer division and dtype rules follow the ONNX operator docs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .tensors import torch_dtype

_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
          "Neg": torch.neg, "Cos": torch.cos, "Sin": torch.sin, "Sqrt": torch.sqrt, "Exp": torch.exp,
          "Log": torch.log, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
          "Ceil": torch.ceil, "Sign": torch.sign, "IsNaN": torch.isnan, "Not": torch.logical_not,
          "Identity": lambda x: x, "Softplus": F.softplus}


def _unary(fn: Callable) -> Callable:
    return lambda ctx, x: fn(x)


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)   # torch has few CPU kernels for these


def _via_int64(fn):
    """fn over uint16/32/64 operands computed in int64 (values past 2**63 are not supported)."""
    def run(ctx, a, b):
        if a.dtype not in _WIDE_UNSIGNED:
            return fn(ctx, a, b)
        out = fn(ctx, a.to(torch.int64), b.to(torch.int64))
        return out if out.dtype == torch.bool else out.to(a.dtype)
    return run


@_via_int64
def _arith(ctx, a, b):
    return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[ctx.op_type](a, b)


@_via_int64
def _div(ctx, a, b):
    if a.dtype.is_floating_point:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _pow(ctx, a, b):
    return torch.pow(a, b).to(a.dtype)


def _mod(ctx, a, b):
    return torch.fmod(a, b) if ctx.attr("fmod", 0) else torch.remainder(a, b)


@_via_int64
def _compare(ctx, a, b):
    return {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
            "Xor": torch.logical_xor}[ctx.op_type](a, b)


def _variadic(ctx, *xs):
    out = xs[0]
    combine = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[ctx.op_type]
    for x in xs[1:]:
        out = combine(out, x)
    return out / len(xs) if ctx.op_type == "Mean" else out


def _where(ctx, cond, a, b):
    return torch.where(cond, a, b)


def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


def _clip(ctx, x, low=None, high=None):
    if ctx.opset < 11:
        low, high = ctx.attr("min", None), ctx.attr("max", None)
    out = x if low is None else torch.maximum(x, low if torch.is_tensor(low) else torch.tensor(low, dtype=x.dtype))
    return out if high is None else torch.minimum(out, high if torch.is_tensor(high) else torch.tensor(high, dtype=x.dtype))


def _cast(ctx, x):
    return x.to(torch_dtype(ctx.attr("to")))


def _cast_like(ctx, x, like):
    return x.to(like.dtype)


def _softmax(ctx, x):
    fn = torch.softmax if ctx.op_type == "Softmax" else torch.log_softmax
    axis = ctx.attr("axis", -1 if ctx.opset >= 13 else 1)
    if ctx.opset >= 13:
        return fn(x, axis)
    axis = axis % x.dim() if x.dim() else 0
    flat = x.reshape(math.prod(x.shape[:axis]), -1)  # before opset 13: over the dims from `axis` on
    return fn(flat, 1).reshape(x.shape)


def _reduce(ctx, x, *_):
    axes = ctx.axes(1)
    keep = bool(ctx.attr("keepdims", 1))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    kind = ctx.op_type
    if kind == "ReduceMean":
        return x.mean(axes, keepdim=keep) if x.numel() else x.sum(axes, keepdim=keep) / 0.0
    if kind == "ReduceSum":
        return x.sum(axes, keepdim=keep, dtype=x.dtype)
    if kind == "ReduceSumSquare":
        return (x * x).sum(axes, keepdim=keep)
    if kind == "ReduceL2":
        return (x * x).sum(axes, keepdim=keep).sqrt()
    if kind == "ReduceProd":
        out = x
        for a in sorted((a % x.dim() for a in axes), reverse=True):
            out = out.prod(a, keepdim=keep)
        return out
    fn = torch.amax if kind == "ReduceMax" else torch.amin
    return fn(x, axes, keepdim=keep)


def _arg(ctx, x):
    axis, keep = ctx.attr("axis", 0), bool(ctx.attr("keepdims", 1))
    if ctx.attr("select_last_index", 0):
        flipped = torch.flip(x, [axis])
        idx = (torch.argmax if ctx.op_type == "ArgMax" else torch.argmin)(flipped, axis, keepdim=keep)
        return x.shape[axis] - 1 - idx
    return (torch.argmax if ctx.op_type == "ArgMax" else torch.argmin)(x, axis, keepdim=keep)


def _topk(ctx, x, k):
    """aten.topk (what the MoE pass finds routers by, and what re-exports); ties may order
    differently from ONNX's lower-index-first rule."""
    wide = x.to(torch.int64) if x.dtype in _WIDE_UNSIGNED else x
    values, indices = torch.topk(wide, int(ctx.const(1).reshape(-1)[0]), dim=ctx.attr("axis", -1),
                                 largest=bool(ctx.attr("largest", 1)), sorted=True)
    return values.to(x.dtype), indices


def _trilu(ctx, x, k=None):
    diagonal = int(ctx.const(1).reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, diagonal) if ctx.attr("upper", 1) else torch.tril(x, diagonal)


MATH_OPS: dict[str, Callable] = {
    **{name: _unary(fn) for name, fn in _UNARY.items()},
    "Add": _arith, "Sub": _arith, "Mul": _arith, "Div": _div, "Pow": _pow, "Mod": _mod, "Equal": _compare,
    "Less": _compare, "Greater": _compare, "LessOrEqual": _compare, "GreaterOrEqual": _compare,
    "And": _compare, "Or": _compare, "Xor": _compare, "Max": _variadic, "Min": _variadic, "Sum": _variadic,
    "Mean": _variadic, "Where": _where, "Gelu": _gelu, "Clip": _clip, "Cast": _cast, "CastLike": _cast_like,
    "Softmax": _softmax, "LogSoftmax": _softmax, "ReduceMean": _reduce, "ReduceSum": _reduce,
    "ReduceMax": _reduce, "ReduceMin": _reduce, "ReduceProd": _reduce, "ReduceL2": _reduce,
    "ReduceSumSquare": _reduce, "ArgMax": _arg, "ArgMin": _arg, "TopK": _topk, "Trilu": _trilu,
}
