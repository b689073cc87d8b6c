"""Shape helpers the attention function bodies share: a batch dim that may be symbolic, lengths read
at run time (a sequence dim that may be symbolic), and the kv heads of grouped-query attention
repeated for their query heads."""
from __future__ import annotations

from .body import Body


def batch_shape(b: Body, batch: int | str, like: str, *rest: int) -> str:
    """The shape [batch, *rest]: constant for a static batch, else with dim 0 read from input `like`."""
    if isinstance(batch, int):
        return b.ints(batch, *rest)
    return b.op("Concat", b.op("Shape", like, start=0, end=1), b.ints(*rest), axis=0)


def length(b: Body, x: str, axis: int) -> str:
    """0-d int64: dim `axis` of x, read at run time (onnxruntime folds it when static)."""
    return b.op("Squeeze", b.op("Shape", x, start=axis, end=axis + 1 if axis != -1 else None), b.ints(0))


def slots(b: Body, count: str) -> str:
    """int64 [N]: 0 .. N - 1 for a count N of shape [1] (a Shape slice)."""
    return b.op("Range", b.const(0), b.op("Squeeze", count, b.ints(0)), b.const(1))


def blocks_of(b: Body, size: str, block: int) -> str:
    """0-d int64: ceil(size / block) for a 0-d length."""
    return b.op("Div", b.op("Add", size, b.const(block - 1)), b.const(block))


def block_bounds(b: Body, size: str, block: int) -> tuple[str, str]:
    """(first, last) in-range position of each block of a length `size`, int64 [N]
    (`sparsecc.runtime.attention_layout`'s `_block_bounds`)."""
    first = b.op("Mul", b.op("Range", b.const(0), blocks_of(b, size, block), b.const(1)), b.const(block))
    last = b.op("Sub", b.op("Min", b.op("Add", first, b.const(block)), size), b.const(1))
    return first, last


def repeat_heads(b: Body, x: str, shape: tuple, hq: int) -> str:
    """[B, Hkv, L, D] -> [B, Hq, L, D], kv head h // (Hq/Hkv) for query head h (B and L may be symbolic)."""
    _, hkv, _, dim = shape
    if hq == hkv:
        return x
    grown = b.op("Expand", b.op("Unsqueeze", x, b.ints(2)), b.ints(1, hkv, hq // hkv, 1, 1))
    return b.op("Reshape", grown, b.ints(0, hq, -1, dim))
