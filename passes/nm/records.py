"""The report record of one N:M rewrite: parameters, bytes and FLOPs before and after, in one place.

Every prune-nm rule (linear, conv2d, stacked experts) describes its rewrite
with `nm_record`: the dense weights it replaced, the (values, indices)
constants that now hold them, and the dense FLOPs of the layer on the example
inputs; the sparse FLOPs are the dense ones times N/M.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torch.fx import GraphModule, Node

from ..fake import resolve_attr
from ..records import RewriteRecord


def size_hint(size) -> int:
    """An int size, or a symbolic size's example hint."""
    return int(size) if isinstance(size, int) else int(size.node.hint)


def example_rows(x, k: int) -> int:
    """Rows of K features that `x` (a FakeTensor) holds on the example inputs; symbolic sizes use their hint."""
    numel = x.numel()
    if not isinstance(numel, int):
        numel = numel.node.hint if numel.node.hint is not None else k
    return int(numel) // k


def nm_record(gm: GraphModule, *, layer: str, op: str, source_op: str, n: int, m: int, shape: list[int],
              dense: Sequence[Tensor], compressed: Sequence[tuple[Node, Node]], flops: int,
              details: dict) -> RewriteRecord:
    """The record of `dense` weights now stored as `compressed` (values, indices) constants of `gm`."""
    stored = [(resolve_attr(gm, v.target), resolve_attr(gm, i.target)) for v, i in compressed]
    return RewriteRecord(
        layer=layer, op=op, source_op=source_op, pattern=f"{n}:{m}", shape=shape,
        params_before=sum(w.numel() for w in dense), params_after=sum(v.numel() for v, _ in stored),
        bytes_before=sum(_nbytes(w) for w in dense),
        bytes_after=sum(_nbytes(v) + _nbytes(i) for v, i in stored),
        flops_before=flops, flops_after=flops * n // m, details={"n": n, "m": m, **details})


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
