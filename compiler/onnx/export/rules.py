"""The ONNX export rules: op registry name -> its local function (standard ops only) and output types."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .functions_attention import block_attention_function, block_layout_function
from .functions_moe import moe_function
from .functions_nm import nm_conv2d_function, nm_decompress_function, nm_linear_function
from .functions_route import route_function, route_gather_function, unroute_function
from .spec import CallSpec


@dataclass(frozen=True)
class ExportRule:
    function: Callable[[CallSpec], onnx.FunctionProto]
    output_types: Callable[[CallSpec], list[int]]   # onnx data types of the node's outputs


def _like(slot: int) -> Callable[[CallSpec], list[int]]:
    return lambda spec: [spec.operands[slot].elem_type]


EXPORT_RULES: dict[str, ExportRule] = {
    "nm_linear": ExportRule(nm_linear_function, _like(0)),
    "nm_decompress": ExportRule(nm_decompress_function, _like(0)),
    "nm_conv2d": ExportRule(nm_conv2d_function, _like(0)),
    "moe": ExportRule(moe_function, _like(0)),
    "block_layout": ExportRule(block_layout_function, lambda spec: [TensorProto.INT32] * 4),
    "block_attention": ExportRule(block_attention_function, _like(0)),
    "route": ExportRule(route_function, lambda spec: [TensorProto.INT64]),
    "route_gather": ExportRule(route_gather_function, _like(0)),
    "unroute": ExportRule(unroute_function, _like(0)),
}


# (operand, axis) pairs that hold a sequence length: the block layout's NQ x NK grid is built from them
_SEQUENCE_AXES = {
    "block_layout": ((0, -2), (0, -1), (1, 2), (2, 2)),     # mask [.., S, Skv], q [B, H, S, D], k
    "block_attention": ((0, 2), (1, 2), (2, 2)),            # q, k, v [B, H, S|Skv, D]
}

# operands whose dim 0 (the batch) may be symbolic: q, k, v, and the layout (topk's has one per batch row)
_BATCHED = {"block_layout": (1, 2), "block_attention": (0, 1, 2, 3, 4, 5, 6)}


def dynamic_shape_misfit(spec: CallSpec) -> str | None:
    """Why the op's function body cannot take the node's symbolic dims, or None when it can.
    The N:M, MoE and routing bodies check their own dims; attention bodies take a symbolic batch
    in q, k and v, every other dim static."""
    if spec.op not in _SEQUENCE_AXES:
        return None
    for slot, axis in _SEQUENCE_AXES[spec.op]:
        operand = spec.operand(slot)
        present = operand is not None and (operand.rank >= -axis if axis < 0 else operand.rank > axis)
        if present and not isinstance(operand.shape[axis], int):
            return (f"attention block layouts need a static sequence length, and operand {slot} has the "
                    f"dynamic length {operand.shape[axis]!r} (shape {list(operand.shape)}); compile with a "
                    "static sequence dim, or without sparse attention")
    for slot, operand in enumerate(spec.operands):
        if operand is None or operand.is_static:
            continue
        if slot not in _BATCHED[spec.op] or not all(isinstance(d, int) for d in operand.shape[1:]):
            return (f"operand {slot} has the shape {list(operand.shape)}: the attention bodies take a dynamic "
                    "batch only in q, k, v and the layout (a mask or layout with a dynamic dim, e.g. a padding mask of a "
                    "dynamic batch, must be static); compile with static shapes, or without sparse attention")
    return None


def rule_name(opdef) -> str:
    """The rule an op's registry entry names (`OpDef.onnx_export`), else its own name."""
    return opdef.onnx_export or opdef.name


def rule_for(op_name: str) -> ExportRule:
    from sparsecc.runtime.ops import get_op
    return EXPORT_RULES[rule_name(get_op(op_name))]
