"""What a `block_attention` node attends to, evaluated at export time where it follows from constants.

visible[h, i, j] = full | (partial & rule) (`sparsecc.runtime.ops.block_attention.visible_elements`)
over the node's layout, which is computed by its `block_layout` node (from a constant mask) or its
`rule_layout` node (from constant rule operands), or is itself constant (folded at compile time).
A layout, mask or rule that depends on a graph input (a padding mask) is not evaluated: the reason
names the input. `contrib_attention` compares the result with what each contrib op attends to.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from onnxscript import ir
from sparsecc.runtime.attention_layout import Layout
from sparsecc.runtime.ops import get_op
from sparsecc.runtime.ops.block_attention import visible_elements

from .body import DOMAIN
from .contrib import LAYOUT_OPS


def static_value(value: ir.Value, opset: int, cache: dict) -> np.ndarray | str:
    """The value's array when it follows from initializers and constants alone, else what it depends on."""
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        return f"graph input '{value.name}'"
    if node.domain not in ("", "ai.onnx"):
        return f"node '{node.name}' ({node.domain}::{node.op_type})"
    if node not in cache:   # keyed by the node itself: a removed node's id may be reused
        feeds = {}
        for inp in node.inputs:
            if inp is not None:
                got = static_value(inp, opset, cache)
                if isinstance(got, str):
                    return got
                feeds[inp.name] = got
        proto = ir.serde.serialize_node(node)
        cache[node] = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
    return np.asarray(cache[node][node.outputs.index(value)])


def node_attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def layout_producer(node: ir.Node) -> ir.Node | str:
    """The block_layout or rule_layout node whose outputs are `node`'s layout (and rule) inputs, else why not."""
    producers = {v.producer() for v in node.inputs[3:7] + node.inputs[9:11] if v is not None}
    layout = producers.pop() if len(producers) == 1 else None
    if layout is None or layout.domain != DOMAIN or layout.op_type not in LAYOUT_OPS:
        return "its layout is not one block_layout or rule_layout node"
    return layout


def _static_arrays(values, opset: int, cache: dict) -> list[np.ndarray] | str:
    """The values' arrays when all follow from constants, else what the first other one depends on."""
    arrays = []
    for value in values:
        got = static_value(value, opset, cache)
        if isinstance(got, str):
            return got
        arrays.append(got)
    return arrays


def _mask_blocks(node: ir.Node, layout: ir.Node, seq: int, opset: int, cache: dict) -> np.ndarray | str:
    """visible of a block_layout's layout over its mask, the node's own mask deciding partial blocks."""
    a = node_attrs(layout)
    mask = node.inputs[7] if len(node.inputs) > 7 else None
    arrays = _static_arrays([layout.inputs[0]] + ([mask] if mask is not None else []), opset, cache)
    if isinstance(arrays, str):
        return f"the mask depends on {arrays}"
    layout_mask, *rule = (torch.from_numpy(x.astype(bool)) for x in arrays)
    blocks = Layout(*torch.ops.sparsecc.block_layout(layout_mask, a["block_q"], a["block_k"],
                                                     a.get("policy", "mask"), a.get("window", 0), a.get("sinks", 0)))
    return visible_elements(blocks, rule[0] if rule else None, seq, seq, a["block_q"], a["block_k"]).numpy()


def _rule_blocks(layout: ir.Node, seq: int, opset: int, cache: dict) -> np.ndarray | str:
    """visible of a rule_layout's layout, its rule deciding partial blocks (inputs: seq, keys, q, k, terms)."""
    a = node_attrs(layout)
    arrays = _static_arrays([layout.inputs[0], layout.inputs[1], *layout.inputs[4:]], opset, cache)
    if isinstance(arrays, str):
        return f"the rule depends on {arrays}"
    (length, keys, *terms), count = arrays, len(layout.inputs[4:]) // 2
    terms = [torch.from_numpy(np.asarray(t)) for t in terms]
    *blocks, rows, cols = torch.ops.sparsecc.rule_layout(
        terms[:count], terms[count:], a["ops"], int(length), int(keys), a["block_q"], a["block_k"],
        a.get("policy", "mask"), a.get("window", 0), a.get("sinks", 0))
    return visible_elements(Layout(*blocks), None, seq, seq, a["block_q"], a["block_k"], rows, cols, a["ops"]).numpy()


def _folded_blocks(node: ir.Node, seq: int, opset: int, cache: dict) -> np.ndarray | str:
    """visible of a node whose layout, mask and rule are constants (a layout folded at compile time)."""
    inputs = list(node.inputs) + [None] * (11 - len(node.inputs))
    given = [v for v in inputs[3:8] + inputs[9:11] if v is not None]
    arrays = _static_arrays(given, opset, cache)
    if isinstance(arrays, str):
        return f"its layout is neither computed by one block_layout or rule_layout node nor constant ({arrays})"
    tensors = iter(torch.from_numpy(np.asarray(x)) for x in arrays)
    layout = Layout(*(next(tensors) for _ in range(4)))
    mask, rows, cols = (None if v is None else next(tensors) for v in (inputs[7], inputs[9], inputs[10]))
    a = node_attrs(node)
    return visible_elements(layout, None if mask is None else mask.bool(), seq, seq, a["block_q"], a["block_k"],
                            rows, cols, a.get("rule_ops", "")).numpy()


def attended(node: ir.Node, layout: ir.Node | str, opset: int, cache: dict) -> np.ndarray | str:
    """visible [Hm, S, S] bool of a node whose layout and mask (or rule) follow from constants, else why not;
    `layout` is the node's layout producer, or why it has none."""
    seq = node.inputs[0].shape[2]
    if isinstance(layout, str):
        seen = _folded_blocks(node, seq, opset, cache)
    elif node_attrs(layout).get("policy", "mask") == "topk":
        return "policy topk chooses blocks from q and k at run time"
    else:
        get_op(layout.op_type)   # registers the sparsecc ops
        seen = (_rule_blocks(layout, seq, opset, cache) if layout.op_type == "rule_layout"
                else _mask_blocks(node, layout, seq, opset, cache))
    if isinstance(seen, str):
        return seen
    if not (seen == seen[:1]).all():
        return "the attended elements differ between batch rows"
    empty = np.nonzero(~seen[0].any(-1))
    if empty[0].size:
        return f"query row {int(empty[1][0])} sees no key"
    return seen[0]
