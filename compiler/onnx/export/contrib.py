"""onnxruntime contrib ops for sparse nodes, where their semantics match the sparse op's exactly.

    sparsecc::moe -> com.microsoft.MoE       softmax scoring, no capacity limit, no shared
                                             expert, float32; gated SiLU experts as swiglu with
                                             gate/up rows interleaved (swiglu_fusion=1,
                                             alpha=1, beta=0, no clamp); ungated relu/gelu/silu
    sparsecc::block_attention                when what it attends to is known at export time
      -> com.microsoft.GroupQueryAttention   and is one causal band i - W < j <= i (a model's
         (local_window_size=W, -1: causal)   own causal or sliding-window mask, policy mask)
      -> com.microsoft.SparseAttention       or is causal over whole key blocks (policy window:
         (block-CSR layout, past/present     a block staircase plus sink blocks); its
          bound to one buffer)               block_layout is evaluated into the CSR layout

The attention mapping and its conditions are in `contrib_attention`. Anything
else keeps its function form, and the export log says why.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from onnxscript import ir

from .spec import CallSpec

CONTRIB = "com.microsoft"
_UNGATED = {"relu": "relu", "gelu": "gelu", "silu": "silu"}
_NO_CONTRIB = {
    "nm_linear": "no contrib op takes N:M-compressed weights",
    "nm_decompress": "no contrib op takes N:M-compressed weights",
    "nm_conv2d": "no contrib op takes N:M-compressed weights",
}


def moe_misfit(spec: CallSpec) -> str | None:
    """Why com.microsoft.MoE would compute something else, or None when it fits."""
    a, ops = spec.attrs, spec.operands
    if a["scoring"] != "softmax":
        return f"scoring {a['scoring']!r} (MoE applies softmax)"
    if a["capacity_factor"] > 0:
        return f"capacity_factor={a['capacity_factor']} (MoE drops no pairs)"
    if len(ops) > 4 and any(op is not None for op in ops[4:]):
        return "a shared expert (MoE has none)"
    if ops[0].elem_type != TensorProto.FLOAT:
        return "hidden is not float32"
    if a["gated"] and a["activation"] != "silu":
        return f"gated {a['activation']} experts (MoE fuses only SiLU gates on CPU)"
    if not a["gated"] and a["activation"] not in _UNGATED:
        return f"activation {a['activation']!r}"
    return None


def _const(graph: ir.Graph, before: ir.Node, values) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.int64))})
    graph.insert_before(before, node)
    return node.outputs[0]


def _interleave(graph: ir.Graph, before: ir.Node, w_gate_up: ir.Value, shape: tuple) -> ir.Value:
    """[E, 2I, H] with gate rows then up rows -> rows g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    experts, rows, width = shape
    split = ir.node("Reshape", [w_gate_up, _const(graph, before, [experts, 2, rows // 2, width])])
    swap = ir.node("Transpose", [split.outputs[0]], {"perm": [0, 2, 1, 3]})
    merged = ir.node("Reshape", [swap.outputs[0], _const(graph, before, [experts, rows, width])])
    graph.insert_before(before, [split, swap, merged])
    return merged.outputs[0]


def moe_contrib(graph: ir.Graph, node: ir.Node, spec: CallSpec) -> None:
    a = spec.attrs
    hidden, logits, w_gate_up, w_down = node.inputs[:4]
    if spec.operands[1].elem_type != spec.operands[0].elem_type:
        cast = ir.node("Cast", [logits], {"to": spec.operands[0].elem_type})
        graph.insert_before(node, cast)
        logits = cast.outputs[0]
    attrs = {"k": int(a["top_k"]), "normalize_routing_weights": int(bool(a["normalize"]))}
    if a["gated"]:
        w_gate_up = _interleave(graph, node, w_gate_up, spec.operands[2].static("w_gate_up"))
        attrs.update(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    else:
        attrs["activation_type"] = _UNGATED[a["activation"]]
    moe = ir.node("MoE", [hidden, logits, w_gate_up, None, w_down], attrs, domain=CONTRIB)
    graph.insert_before(node, moe)
    moe.outputs[0].shape, moe.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
    ir.convenience.replace_all_uses_with(node.outputs[0], moe.outputs[0])
    if node.outputs[0] in graph.outputs:
        graph.outputs[graph.outputs.index(node.outputs[0])] = moe.outputs[0]
    graph.remove(node, safe=True)


def try_contrib(model: ir.Model, node: ir.Node, spec: CallSpec,
                attention_lines: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(contrib op used or None, one log line). Attention nodes were decided by
    `contrib_attention.map_attention`; `attention_lines` holds the log lines of those it kept."""
    where = f"{spec.op} '{spec.node}'"
    if spec.op in ("block_attention", "block_layout"):
        return None, (attention_lines or {}).get(node.name, f"{where}: not examined for contrib ops; function form")
    if spec.op != "moe":
        return None, f"{where}: {_NO_CONTRIB.get(spec.op, 'no contrib op computes it')}; function form"
    misfit = moe_misfit(spec)
    if misfit:
        return None, f"{where}: com.microsoft.MoE does not fit ({misfit}); function form"
    moe_contrib(model.graph, node, spec)
    return "com.microsoft.MoE", f"{where}: com.microsoft.MoE"
