"""Multiply-add FLOPs of a routed block's body, from the shapes in `meta["val"]` (2 per multiply-add).

Counted: linear, addmm, mm, bmm, matmul, attention, and the sparse ops with a
matmul inside (`sparsecc.moe` as dispatched: top_k experts per token;
`sparsecc.nm_linear` over kept weights). Elementwise work is not counted.
"""
from __future__ import annotations

import math

import torch
from sparsecc.runtime.ops.moe import moe_flops
from torch.fx import Node

from .blocks import ATTENTION

aten = torch.ops.aten


def _shape(node) -> list[int]:
    """Sizes, a dynamic dim at its example hint (`int()` on it would specialise the graph to the example)."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return []
    return [d if isinstance(d, int) else int(d.node.hint) if d.node.hint is not None else 0 for d in val.shape]


def _numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 0


def node_flops(node: Node) -> int:
    target, out = node.target, _shape(node)
    if target in (aten.linear.default, aten.mm.default, aten.bmm.default, aten.matmul.default):
        return 2 * _numel(out) * (_shape(node.args[0]) or [0])[-1]
    if target is aten.addmm.default:
        return 2 * _numel(out) * (_shape(node.args[1]) or [0])[-1]
    if target in ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 4 * _numel(q) * k[-2] if q and k else 0
    name = getattr(target, "_opname", "") if getattr(target, "namespace", "") == "sparsecc" else ""
    if name == "moe":
        hidden, down = _shape(node.args[0]), _shape(node.args[3])
        return moe_flops(hidden[0], hidden[1], down[2], down[0], int(node.args[7]), bool(node.args[11]))[1]
    if name == "nm_linear":
        return 2 * _numel(out) * (_shape(node.args[1]) or [0])[-1]
    return 0


def body_flops(body: list[Node]) -> int:
    return sum(node_flops(n) for n in body if n.op == "call_function")


__all__ = ["body_flops", "node_flops"]
