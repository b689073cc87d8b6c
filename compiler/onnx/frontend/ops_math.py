"""ONNX operators as torch code (ATen ops under torch.export): the importer's op table, part 1.

Each entry is fn(ctx, *inputs) -> output or tuple of outputs. `inputs` are torch
tensors (None for an omitted optional input); `ctx.attr(name, default)` reads an
attribute and `ctx.const(i)` the value of input i as Python numbers, which the
importer has folded at import time (shapes, axes, sizes) or fails naming the node.
Broadcasting, integer division and dtype rules follow the ONNX operator docs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

OPS: dict[str, Callable] = {}


def op(*names: str):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


# numpy has no bfloat16 / float8: onnx returns ml_dtypes arrays, viewed as torch dtypes through their bits
_BIT_VIEWS = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
              "float8_e5m2": (np.uint8, torch.float8_e5m2), "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz),
              "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz)}


def torch_dtype(onnx_type: int) -> torch.dtype:
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))
    if np_dtype.name in _BIT_VIEWS:
        return _BIT_VIEWS[np_dtype.name][1]
    try:
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except TypeError:
        raise ValueError(f"data type {TensorProto.DataType.Name(onnx_type)} has no torch equivalent") from None


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy (or ml_dtypes) array as a torch tensor that owns its memory."""
    array = np.asarray(array)
    if array.dtype.name in _BIT_VIEWS:
        bits, dtype = _BIT_VIEWS[array.dtype.name]
        return torch.from_numpy(np.array(array.view(bits), copy=True)).view(dtype)
    return torch.from_numpy(np.array(array, copy=True))


def _unary(name: str, fn: Callable) -> None:
    OPS[name] = lambda ctx, x: fn(x)


for _name, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
                   "Neg": torch.neg, "Cos": torch.cos, "Sin": torch.sin, "Sqrt": torch.sqrt, "Exp": torch.exp,
                   "Log": torch.log, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
                   "Ceil": torch.ceil, "Sign": torch.sign, "IsNaN": torch.isnan, "Not": torch.logical_not,
                   "Identity": lambda x: x, "Softplus": F.softplus}.items():
    _unary(_name, _fn)


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)   # torch has few CPU kernels for these


def _via_int64(fn):
    """fn over uint16/32/64 operands computed in int64 (values past 2**63 are not supported)."""
    def run(ctx, a, b):
        if a.dtype not in _WIDE_UNSIGNED:
            return fn(ctx, a, b)
        out = fn(ctx, a.to(torch.int64), b.to(torch.int64))
        return out if out.dtype == torch.bool else out.to(a.dtype)
    return run


@op("Add", "Sub", "Mul")
@_via_int64
def _arith(ctx, a, b):
    return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[ctx.op_type](a, b)


@op("Div")
@_via_int64
def _div(ctx, a, b):
    if a.dtype.is_floating_point:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow")
def _pow(ctx, a, b):
    return torch.pow(a, b).to(a.dtype)


@op("Mod")
def _mod(ctx, a, b):
    return torch.fmod(a, b) if ctx.attr("fmod", 0) else torch.remainder(a, b)


@op("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
@_via_int64
def _compare(ctx, a, b):
    return {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
            "Xor": torch.logical_xor}[ctx.op_type](a, b)


@op("Max", "Min", "Sum", "Mean")
def _variadic(ctx, *xs):
    out = xs[0]
    combine = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[ctx.op_type]
    for x in xs[1:]:
        out = combine(out, x)
    return out / len(xs) if ctx.op_type == "Mean" else out


@op("Where")
def _where(ctx, cond, a, b):
    return torch.where(cond, a, b)


@op("Gelu")
def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


@op("Clip")
def _clip(ctx, x, low=None, high=None):
    if ctx.opset < 11:
        low, high = ctx.attr("min", None), ctx.attr("max", None)
    out = x if low is None else torch.maximum(x, low if torch.is_tensor(low) else torch.tensor(low, dtype=x.dtype))
    return out if high is None else torch.minimum(out, high if torch.is_tensor(high) else torch.tensor(high, dtype=x.dtype))


@op("Cast")
def _cast(ctx, x):
    return x.to(torch_dtype(ctx.attr("to")))


@op("CastLike")
def _cast_like(ctx, x, like):
    return x.to(like.dtype)


@op("Softmax", "LogSoftmax")
def _softmax(ctx, x):
    fn = torch.softmax if ctx.op_type == "Softmax" else torch.log_softmax
    axis = ctx.attr("axis", -1 if ctx.opset >= 13 else 1)
    if ctx.opset >= 13:
        return fn(x, axis)
    axis = axis % x.dim() if x.dim() else 0
    flat = x.reshape(math.prod(x.shape[:axis]), -1)  # before opset 13: over the dims from `axis` on
    return fn(flat, 1).reshape(x.shape)


def _axes(ctx, index: int, attr: str = "axes"):
    """Axes from input `index` (newer opsets) or the attribute (older); None when absent."""
    if len(ctx.node.input) > index and ctx.node.input[index]:
        return [int(a) for a in ctx.const(index)]
    value = ctx.attr(attr, None)
    return None if value is None else list(value)


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
def _reduce(ctx, x, *_):
    axes = _axes(ctx, 1)
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


@op("ArgMax", "ArgMin")
def _arg(ctx, x):
    axis, keep = ctx.attr("axis", 0), bool(ctx.attr("keepdims", 1))
    if ctx.attr("select_last_index", 0):
        flipped = torch.flip(x, [axis])
        idx = (torch.argmax if ctx.op_type == "ArgMax" else torch.argmin)(flipped, axis, keepdim=keep)
        return x.shape[axis] - 1 - idx
    return (torch.argmax if ctx.op_type == "ArgMax" else torch.argmin)(x, axis, keepdim=keep)


@op("TopK")
def _topk(ctx, x, k):
    """aten.topk (what the MoE pass finds routers by, and what re-exports); ties may order
    differently from ONNX's lower-index-first rule."""
    wide = x.to(torch.int64) if x.dtype in _WIDE_UNSIGNED else x
    values, indices = torch.topk(wide, int(ctx.const(1).reshape(-1)[0]), dim=ctx.attr("axis", -1),
                                 largest=bool(ctx.attr("largest", 1)), sorted=True)
    return values.to(x.dtype), indices


@op("Trilu")
def _trilu(ctx, x, k=None):
    diagonal = int(ctx.const(1).reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, diagonal) if ctx.attr("upper", 1) else torch.tril(x, diagonal)
