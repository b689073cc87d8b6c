"""onnxruntime contrib ops for sparse nodes, where their semantics match the sparse op's exactly.

    sparsecc::moe -> com.microsoft.MoE       softmax scoring, no capacity limit, no shared
                                             expert, no correction bias, one group, scale 1,
                                             float32; gated SiLU experts as swiglu with gate/up
                                             rows interleaved (swiglu_fusion=1, alpha=1, beta=0,
                                             no clamp), GPT-OSS's clamped SwiGLU as swiglu with
                                             alpha, beta=1 and swiglu_limit; ungated relu/gelu/silu;
                                             expert biases as fc1/fc2_experts_bias
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

from .functions_moe import INPUTS, given_operands
from .spec import CallSpec

CONTRIB = "com.microsoft"
LAYOUT_OPS = ("block_layout", "rule_layout")   # what feeds block_attention its layout
_UNGATED = {"relu": "relu", "gelu": "gelu", "silu": "silu"}
_GATED = ("silu", "swiglu_clamped")   # MoE's swiglu: G * sigmoid(alpha G) * (clamp(L) + beta), G = min(g, limit)
_NO_CONTRIB = {
    "nm_linear": "no contrib op takes N:M-compressed weights",
    "nm_decompress": "no contrib op takes N:M-compressed weights",
    "nm_conv2d": "no contrib op takes N:M-compressed weights",
}


def _routing_misfit(a: dict, given: dict) -> str | None:
    """Why MoE's routing (softmax, top-k on the scores, optional renormalise) is not the call's."""
    if a["scoring"] != "softmax":
        return f"scoring {a['scoring']!r} (MoE applies softmax; its sparse mixer differs on CPU)"
    if a["capacity_factor"] > 0:
        return f"capacity_factor={a['capacity_factor']} (MoE drops no pairs)"
    if "score_correction_bias" in given:
        return "a score_correction_bias (MoE selects experts on the scores themselves)"
    if a["n_group"] > 1:
        return f"group-limited top-k, n_group={a['n_group']} (MoE picks from every expert)"
    if a["routed_scaling_factor"] != 1.0:
        return f"routed_scaling_factor={a['routed_scaling_factor']} (MoE does not scale its weights)"
    return None


def moe_misfit(spec: CallSpec) -> str | None:
    """Why com.microsoft.MoE would compute something else, or None when it fits."""
    a, given = spec.attrs, given_operands(spec)
    misfit = _routing_misfit(a, given)
    if misfit:
        return misfit
    if given.keys() & {"shared_gate_up", "shared_down", "shared_gate"}:
        return "a shared expert (MoE has none)"
    if given["hidden"].elem_type != TensorProto.FLOAT:
        return "hidden is not float32"
    if a["gated"] and a["activation"] not in _GATED:
        return f"gated {a['activation']} experts (MoE fuses only SiLU gates and clamped SwiGLU on CPU)"
    if not a["gated"] and a["activation"] not in _UNGATED:
        return f"activation {a['activation']!r}"
    return None


def _const(graph: ir.Graph, before: ir.Node, values) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(values, dtype=np.int64))})
    graph.insert_before(before, node)
    return node.outputs[0]


def _interleave(graph: ir.Graph, before: ir.Node, gate_up: ir.Value, shape: tuple) -> ir.Value:
    """[E, 2I, ...] with gate rows then up rows -> rows g0, u0, g1, u1, ... (swiglu_fusion=1);
    a weight [E, 2I, H] or a bias [E, 2I]."""
    experts, rows, *rest = shape
    split = ir.node("Reshape", [gate_up, _const(graph, before, [experts, 2, rows // 2, *rest])])
    swap = ir.node("Transpose", [split.outputs[0]], {"perm": [0, 2, 1, *range(3, 3 + len(rest))]})
    merged = ir.node("Reshape", [swap.outputs[0], _const(graph, before, [experts, rows, *rest])])
    graph.insert_before(before, [split, swap, merged])
    return merged.outputs[0]


def _swiglu_attributes(a: dict) -> dict:
    """MoE's swiglu for SiLU gates (alpha 1, beta 0, no clamp) or GPT-OSS's clamped SwiGLU."""
    if a["activation"] == "swiglu_clamped":
        return dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=float(a["swiglu_alpha"]),
                    activation_beta=1.0, swiglu_limit=float(a["swiglu_limit"]))
    return dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)


def moe_contrib(graph: ir.Graph, node: ir.Node, spec: CallSpec) -> None:
    a, given = spec.attrs, given_operands(spec)
    inputs = dict(zip(INPUTS, node.inputs))
    hidden, logits, w_gate_up, w_down = (inputs[name] for name in INPUTS[:4])
    b_gate_up, b_down = inputs.get("b_gate_up"), inputs.get("b_down")
    if given["router_logits"].elem_type != given["hidden"].elem_type:
        cast = ir.node("Cast", [logits], {"to": given["hidden"].elem_type})
        graph.insert_before(node, cast)
        logits = cast.outputs[0]
    attrs = {"k": int(a["top_k"]), "normalize_routing_weights": int(bool(a["normalize"]))}
    if a["gated"]:
        if not a["interleaved"]:
            w_gate_up = _interleave(graph, node, w_gate_up, given["w_gate_up"].static("w_gate_up"))
            if b_gate_up is not None:
                b_gate_up = _interleave(graph, node, b_gate_up, given["b_gate_up"].static("b_gate_up"))
        attrs.update(_swiglu_attributes(a))
    else:
        attrs["activation_type"] = _UNGATED[a["activation"]]
    moe = ir.node("MoE", [hidden, logits, w_gate_up, b_gate_up, w_down, b_down], attrs, domain=CONTRIB)
    graph.insert_before(node, moe)
    moe.outputs[0].shape, moe.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
    name = node.outputs[0].name
    ir.convenience.replace_all_uses_with(node.outputs[0], moe.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    moe.outputs[0].name = name   # a graph output keeps its name


def try_contrib(model: ir.Model, node: ir.Node, spec: CallSpec,
                attention_lines: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(contrib op used or None, one log line). Attention nodes were decided by
    `contrib_attention.map_attention`; `attention_lines` holds the log lines of those it kept."""
    where = f"{spec.op} '{spec.node}'"
    if spec.op == "block_attention" or spec.op in LAYOUT_OPS:
        return None, (attention_lines or {}).get(node.name, f"{where}: not examined for contrib ops; function form")
    if spec.op != "moe":
        return None, f"{where}: {_NO_CONTRIB.get(spec.op, 'no contrib op computes it')}; function form"
    misfit = moe_misfit(spec)
    if misfit:
        return None, f"{where}: com.microsoft.MoE does not fit ({misfit}); function form"
    moe_contrib(model.graph, node, spec)
    return "com.microsoft.MoE", f"{where}: com.microsoft.MoE"
