"""The ONNX export rules: op registry name -> its local function (standard ops only) and output types."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .functions_attention import block_attention_function, block_layout_function, rule_layout_function
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
    "rule_layout": ExportRule(rule_layout_function, lambda spec: [TensorProto.INT32] * 4 + [TensorProto.INT64] * 2),
    "route": ExportRule(route_function, lambda spec: [TensorProto.INT64]),
    "route_gather": ExportRule(route_gather_function, _like(0)),
    "unroute": ExportRule(unroute_function, _like(0)),
}


# (operand, axis) pairs that must be static: the function body is shaped by them
_STATIC_AXES = {
    "block_layout": ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)),   # topk: q, k [B, H, S|Skv, D]
    "rule_layout": ((2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)),   # topk only: q, k [B, H, S|Skv, D]
    "block_attention": ((0, 1), (0, 3), (1, 1), (1, 3), (2, 1), (2, 3)),   # heads and head dims
}
_WHY = {
    "block_layout": "a layout read off a materialised mask needs a static sequence length, its S x Skv grid "
                    "shapes the body (masks the compiler reads as a rule, sparsecc::rule_layout, export with a "
                    "dynamic length)",
    "rule_layout": "policy topk pools q and k into blocks shaped by S and Skv",
    "block_attention": "the body is shaped by the head counts and head dims",
}
_THRESHOLD_AXES = ((0, 2), (1, 2), (2, 2), (3, 2), (4, 2), (4, 3))   # BLASST's Loop: S, Skv, NQ, NK


def _static_axes(spec: CallSpec) -> tuple[tuple[tuple[int, int], ...], str]:
    if spec.op == "rule_layout" and spec.attrs.get("policy", "mask") != "topk":
        return (), ""
    if spec.op == "block_attention" and spec.attrs.get("threshold", 0.0) > 0:
        return _STATIC_AXES[spec.op] + _THRESHOLD_AXES, "threshold skipping (BLASST) loops over a static block grid"
    return _STATIC_AXES.get(spec.op, ()), _WHY.get(spec.op, "")


def dynamic_shape_misfit(spec: CallSpec) -> str | None:
    """Why the op's function body cannot take the node's symbolic dims, or None when it can.
    The N:M, MoE and routing bodies check their own dims; attention bodies read batch and sequence
    lengths at run time except where `_static_axes` says (block_layout: its mask's shape is static)."""
    axes, why = _static_axes(spec)
    if spec.op == "block_layout" and spec.operand(0) is not None and not spec.operands[0].is_static:
        return (f"the mask has the shape {list(spec.operands[0].shape)}: {why}; compile with static shapes, "
                "or without sparse attention")
    for slot, axis in axes:
        operand = spec.operand(slot)
        present = operand is not None and (operand.rank >= -axis if axis < 0 else operand.rank > axis)
        if present and not isinstance(operand.shape[axis], int):
            return (f"operand {slot} has the dynamic dim {operand.shape[axis]!r} at axis {axis} (shape "
                    f"{list(operand.shape)}): {why}; compile with a static sequence dim, or without this policy")
    return None


def rule_name(opdef) -> str:
    """The rule an op's registry entry names (`OpDef.onnx_export`), else its own name."""
    return opdef.onnx_export or opdef.name


def rule_for(op_name: str) -> ExportRule:
    from sparsecc.runtime.ops import get_op
    return EXPORT_RULES[rule_name(get_op(op_name))]
