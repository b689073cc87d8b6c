"""ONNX operators as torch code, part 2: shapes, indexing and constants (calling convention: `op_table`)."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from onnx import numpy_helper

from .tensors import to_torch


def _constant(ctx):
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        value = ctx.attr(name, None)
        if value is not None:
            break
    else:
        raise ValueError(f"Constant node '{ctx.node.name}': only value/value_float(s)/value_int(s) are supported")
    if name == "value":
        return to_torch(numpy_helper.to_array(value))
    dtype = np.float32 if "float" in name else np.int64
    return to_torch(np.asarray(value, dtype=dtype))


def _constant_of_shape(ctx, shape):
    value = ctx.attr("value", None)
    fill = to_torch(numpy_helper.to_array(value)) if value is not None else torch.zeros(1)
    return torch.full([int(d) for d in ctx.const(0)], fill.reshape(-1)[0].item(), dtype=fill.dtype)


def _shape(ctx, x):
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def _range(ctx, start, limit, delta):
    s, lim, d = (ctx.const(i).reshape(-1)[0].item() for i in range(3))
    count = max(math.ceil((lim - s) / d), 0)
    return (torch.arange(count, dtype=torch.float64) * d + s).to(start.dtype)


def _reshape(ctx, x, shape):
    target = [int(d) for d in ctx.const(1)]
    if not ctx.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _flatten(ctx, x):
    axis = ctx.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(ctx, x):
    perm = ctx.attr("perm", None)
    return x.permute(list(perm) if perm is not None else list(range(x.dim()))[::-1])


def _concat(ctx, *xs):
    return torch.cat([x for x in xs if x is not None], ctx.attr("axis"))


def _split(ctx, x, split=None):
    axis, outputs = ctx.attr("axis", 0), len(ctx.node.output)
    sizes = ctx.axes(1, "split")
    if sizes is None:
        length = x.shape[axis]
        count = ctx.attr("num_outputs", outputs)
        chunk = -(-length // count)
        sizes = [min(chunk, length - i * chunk) for i in range(count)]
    return tuple(torch.split(x, sizes, axis))


def _slice(ctx, x, starts, ends, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes", None)
        steps = None
    else:
        starts, ends = [int(v) for v in ctx.const(1)], [int(v) for v in ctx.const(2)]
        axes = [int(v) for v in ctx.const(3)] if axes is not None else None
        steps = [int(v) for v in ctx.const(4)] if steps is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        out = _slice_axis(out, axis % x.dim(), start, end, step)
    return out


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    """One axis of ONNX Slice: clamp as the spec says, negative steps by explicit indices."""
    size = x.shape[axis]
    if step > 0:
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        index = [slice(None)] * axis + [slice(start, max(end, start), step)]
        return x[tuple(index)]
    start = min(max(start + size if start < 0 else start, -1), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    picks = list(range(start, end, step))
    return torch.index_select(x, axis, torch.tensor(picks, dtype=torch.int64))


def _gather(ctx, data, indices):
    axis = ctx.attr("axis", 0) % data.dim()
    size = data.shape[axis]
    flat = indices.reshape(-1).to(torch.int64)
    flat = torch.where(flat < 0, flat + size, flat)
    picked = torch.index_select(data, axis, flat)
    return picked.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1:])


def _gather_elements(ctx, data, indices):
    axis = ctx.attr("axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return torch.gather(data, axis, indices.to(torch.int64))


def _unsqueeze(ctx, x, axes=None):
    axes = ctx.axes(1)
    rank = x.dim() + len(axes)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = out.unsqueeze(axis)
    return out


def _squeeze(ctx, x, axes=None):
    axes = ctx.axes(1)
    if axes is None:
        return x.squeeze() if x.dim() else x
    return x.squeeze([a % x.dim() for a in axes]) if axes else x


def _expand(ctx, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in ctx.const(1)))
    return x.expand(target)


def _tile(ctx, x, repeats):
    return x.repeat([int(r) for r in ctx.const(1)])


def _dropout(ctx, x, *_):
    return (x, torch.ones_like(x, dtype=torch.bool)) if len(ctx.node.output) > 1 else x


def _gather_nd(ctx, data, indices):
    """out[b..., i..., :] = data[b..., indices[b..., i..., 0], ..., indices[b..., i..., q-1], :]
    with `batch_dims` leading b: one advanced index (aten.index), the form torch code
    `weight[expert_ids]` captures as; aranges select the batch dims, negative indices wrap."""
    b = ctx.attr("batch_dims", 0)
    indices = indices if indices.dtype == torch.int64 else indices.to(torch.int64)
    rank = indices.dim() - 1                        # dims of the index tuples: batch + the rest
    batch = [torch.arange(data.shape[j]).reshape([-1 if d == j else 1 for d in range(rank)]) for j in range(b)]
    return data[tuple(batch + [indices[..., j] for j in range(indices.shape[-1])])]


SHAPE_OPS: dict[str, Callable] = {
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape, "Size": _size,
    "Range": _range, "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Concat": _concat,
    "Split": _split, "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Expand": _expand, "Tile": _tile, "Dropout": _dropout,
    "GatherND": _gather_nd,
}
