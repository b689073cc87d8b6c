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


def rule_name(opdef) -> str:
    """The rule an op's registry entry names (`OpDef.onnx_export`), else its own name."""
    return opdef.onnx_export or opdef.name


def rule_for(op_name: str) -> ExportRule:
    from sparsecc.runtime.ops import get_op
    return EXPORT_RULES[rule_name(get_op(op_name))]
