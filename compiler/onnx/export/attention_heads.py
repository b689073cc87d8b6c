"""Shape helpers the attention function bodies share: a batch dim that may be symbolic, and the
kv heads of grouped-query attention repeated for their query heads."""
from __future__ import annotations

from .body import Body


def batch_shape(b: Body, batch: int | str, like: str, *rest: int) -> str:
    """The shape [batch, *rest]: constant for a static batch, else with dim 0 read from input `like`."""
    if isinstance(batch, int):
        return b.ints(batch, *rest)
    return b.op("Concat", b.op("Shape", like, start=0, end=1), b.ints(*rest), axis=0)


def repeat_heads(b: Body, x: str, shape: tuple, hq: int) -> str:
    """[B, Hkv, L, D] -> [B, Hq, L, D], kv head h // (Hq/Hkv) for query head h (B may be symbolic)."""
    _, hkv, length, dim = shape
    if hq == hkv:
        return x
    grown = b.op("Expand", b.op("Unsqueeze", x, b.ints(2)), b.ints(1, hkv, hq // hkv, length, dim))
    return b.op("Reshape", grown, b.ints(0, hq, length, dim))
