"""Function body of `sparsecc::moe` in standard ONNX: route, then one unrolled branch per expert.

    scores = Softmax|Sigmoid(router_logits) (fp32);  choice = scores + score_correction_bias
    n_group > 1: choice Reshape'd to [T, G, E/G], group score = ReduceSum(TopK(., 2)), the groups
                 outside TopK(group scores, topk_group) set to -inf, Reshape'd back
    experts = TopK(choice, top_k).indices;  weights = GatherElements(scores, experts)
    sparsemixer: top_k rounds of TopK(untaken, 1), the softmax of the untaken logits with the
                 far ones (gap / Max(|s|, best) > 2*eps) at -inf, read at the pick (GatherElements)
    weights normalised if asked, times routed_scaling_factor, cast to hidden's dtype
    for e in 0..E-1:    pairs  = NonZero(experts == e)          [2, c]: (token, slot), token order
                        (first ceil(cf*T*k/E) pairs when capacity_factor > 0; in float64
                        in the graph when the token count T is dynamic)
                        y     += ScatterND(add) at token of  w[token, slot] * expert_e(hidden[token])
    expert_e(x) = act(x @ gate_up_e.T + b_gate_up[e]) @ down_e.T + b_down[e]: gate/up by Split, or
                  Slice step 2 when interleaved; "swiglu_clamped": (Clip(up) + 1) * g * Sigmoid(alpha * g),
                  g = Min(gate, limit)
    y += shared(hidden) * Sigmoid(hidden @ shared_gate.T)            (when given)

Every expert reads only its own tokens, so the work is T*k expert MLPs, as in the
sparse op; Gather(w, e) of a constant weight is folded by onnxruntime at load.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper

from .body import Body
from .spec import CallSpec, Operand

INPUTS = ("hidden", "router_logits", "w_gate_up", "w_down", "shared_gate_up", "shared_down", "shared_gate",
          "score_correction_bias", "b_gate_up", "b_down")
GROUP_SCORE_TOP = 2   # a group's score is the sum of its best 2 choice values (runtime.moe_routing)


def given_operands(spec: CallSpec) -> dict[str, Operand]:
    """The call's tensor operands by name (`INPUTS`), omitted optionals left out."""
    return {name: op for name, op in zip(INPUTS, spec.operands) if op is not None}


def activation(b: Body, x: str, name: str, dtype) -> str:
    """The MoE activations of `sparsecc.runtime.kernels.cpu.moe.ACTIVATIONS` in standard ops."""
    c = lambda v: b.const(v, dtype)
    if name == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if name == "relu":
        return b.op("Relu", x)
    if name == "gelu":
        erf = b.op("Erf", b.op("Mul", x, c(1 / math.sqrt(2))))
        return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", erf, c(1.0)))
    if name == "gelu_tanh":
        cube = b.op("Mul", b.op("Mul", b.op("Mul", x, x), x), c(0.044715))
        inner = b.op("Tanh", b.op("Mul", b.op("Add", x, cube), c(math.sqrt(2 / math.pi))))
        return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", inner, c(1.0)))
    raise ValueError(f"activation {name!r} has no ONNX form")


def gated_hidden(b: Body, projected: str, a: dict, dtype) -> str:
    """act(gate) * up from a gated projection [rows, 2I]: halves, or even/odd columns when interleaved;
    "swiglu_clamped" is GPT-OSS's (Clip(up, +-limit) + 1) * g * Sigmoid(alpha * g), g = Min(gate, limit)."""
    if a["interleaved"]:
        gate = b.op("Slice", projected, b.ints(0), b.ints(2**62), b.ints(1), b.ints(2))
        up = b.op("Slice", projected, b.ints(1), b.ints(2**62), b.ints(1), b.ints(2))
    else:
        gate, up = b.op("Split", projected, axis=1, num_outputs=2, outputs=2)
    if a["activation"] != "swiglu_clamped":
        return b.op("Mul", activation(b, gate, a["activation"], dtype), up)
    limit = a["swiglu_limit"]
    gate = b.op("Min", gate, b.const(limit, dtype))
    up = b.op("Clip", up, b.const(-limit, dtype), b.const(limit, dtype))
    swish = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, b.const(a["swiglu_alpha"], dtype))))
    return b.op("Mul", b.op("Add", up, b.const(1.0, dtype)), swish)


def expert_mlp(b: Body, rows: str, gate_up: str, down: str, a: dict, dtype,
               gate_up_bias: str | None = None, down_bias: str | None = None) -> str:
    """act(rows @ gate_up.T + gate_up_bias) @ down.T + down_bias, act as `gated_hidden` when gated."""
    projected = b.op("MatMul", rows, b.op("Transpose", gate_up, perm=[1, 0]))
    projected = b.op("Add", projected, gate_up_bias) if gate_up_bias else projected
    if a["gated"]:
        hidden = gated_hidden(b, projected, a, dtype)
    else:
        hidden = activation(b, projected, a["activation"], dtype)
    out = b.op("MatMul", hidden, b.op("Transpose", down, perm=[1, 0]))
    return b.op("Add", out, down_bias) if down_bias else out


def group_limited(b: Body, choice: str, num_experts: int, n_group: int, topk_group: int) -> str:
    """choice [T, E] with -inf outside each token's best topk_group of n_group consecutive expert groups."""
    grouped = b.op("Reshape", choice, b.ints(-1, n_group, num_experts // n_group))
    best, _ = b.op("TopK", grouped, b.ints(GROUP_SCORE_TOP), axis=-1, outputs=2)
    _, kept = b.op("TopK", b.op("ReduceSum", best, b.ints(-1), keepdims=0), b.ints(topk_group), axis=-1, outputs=2)
    hits = b.op("Equal", b.op("Unsqueeze", kept, b.ints(-1)), b.const(np.arange(n_group)))   # [T, kg, G]
    is_kept = b.op("ReduceMax", b.op("Cast", hits, to=TensorProto.INT64), b.ints(1), keepdims=0)
    dropped = b.op("Unsqueeze", b.op("Equal", is_kept, b.const(0)), b.ints(-1))             # [T, G, 1]
    masked = b.op("Where", dropped, b.const(-np.inf, np.float32), grouped)
    return b.op("Reshape", masked, b.ints(-1, num_experts))


def sparsemixer(b: Body, logits: str, top_k: int, eps: float, num_experts: int) -> tuple[str, str]:
    """(weights, experts) [T, k] fp32/int64 of PhiMoE's inference routing (`runtime.moe_routing.sparsemixer`)."""
    weights, experts, untaken, columns = [], [], logits, b.const(np.arange(num_experts))
    for _ in range(top_k):
        best, index = b.op("TopK", untaken, b.ints(1), axis=-1, outputs=2)
        gap = b.op("Div", b.op("Sub", best, logits), b.op("Max", b.op("Abs", logits), best))
        far = b.op("Greater", gap, b.const(2 * eps, np.float32))
        pool = b.op("Where", far, b.const(-np.inf, np.float32), untaken)
        weights.append(b.op("GatherElements", b.op("Softmax", pool, axis=-1), index, axis=-1))
        experts.append(index)
        untaken = b.op("Where", b.op("Equal", columns, index), b.const(-np.inf, np.float32), untaken)
    return b.op("Concat", *weights, axis=-1), b.op("Concat", *experts, axis=-1)


def select(b: Body, spec: CallSpec, logits: str, present: list[str], num_experts: int) -> tuple[str, str]:
    """(weights, experts) [T, k] before normalising: TopK of the corrected, group-limited scores,
    weighted by the uncorrected ones."""
    a = spec.attrs
    scores = b.op("Softmax", logits, axis=-1) if a["scoring"] == "softmax" else b.op("Sigmoid", logits)
    choice = scores
    if "score_correction_bias" in present:
        choice = b.op("Add", choice, b.op("Cast", "score_correction_bias", to=TensorProto.FLOAT))
    if a["n_group"] > 1:
        choice = group_limited(b, choice, num_experts, a["n_group"], a["topk_group"])
    weights, experts = b.op("TopK", choice, b.ints(a["top_k"]), axis=-1, largest=1, sorted=1, outputs=2)
    if choice != scores:
        weights = b.op("GatherElements", scores, experts, axis=1)
    return weights, experts


def route(b: Body, spec: CallSpec, present: list[str], num_experts: int) -> tuple[str, str]:
    """(flat weights [T*k] in hidden's dtype, experts [T, k] int64)."""
    a = spec.attrs
    logits = b.op("Cast", "router_logits", to=TensorProto.FLOAT)
    if a["scoring"] == "sparsemixer":
        weights, experts = sparsemixer(b, logits, a["top_k"], a["sparsemixer_eps"], num_experts)
    else:
        weights, experts = select(b, spec, logits, present, num_experts)
    if a["normalize"]:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints(-1), keepdims=1))
    if a["routed_scaling_factor"] != 1.0:
        weights = b.op("Mul", weights, b.const(a["routed_scaling_factor"], np.float32))
    weights = b.op("Cast", weights, to=spec.operands[0].elem_type)
    return b.op("Reshape", weights, b.ints(-1)), experts


def capacity_limit(b: Body, spec: CallSpec, num_experts: int) -> str | None:
    """[1] int64 pairs each expert keeps, or None without a capacity factor. A static T gives the
    constant ceil(cf*T*k/E); a dynamic one ceil(cf*(T*k)/E) in float64, as runtime.moe_routing.capacity."""
    a, hidden = spec.attrs, spec.operands[0]
    if a["capacity_factor"] <= 0:
        return None
    if hidden.is_static:
        return b.ints(math.ceil(a["capacity_factor"] * hidden.shape[0] * a["top_k"] / num_experts))
    pairs = b.op("Mul", b.op("Shape", "hidden", start=0, end=1), b.ints(a["top_k"]))
    scaled = b.op("Mul", b.op("Cast", pairs, to=TensorProto.DOUBLE), b.const(a["capacity_factor"], np.float64))
    limit = b.op("Ceil", b.op("Div", scaled, b.const(float(num_experts), np.float64)))
    return b.op("Cast", limit, to=TensorProto.INT64)


def expert_bias(b: Body, bias: str, present: list[str], expert: int) -> str | None:
    """Row `expert` of a per-expert bias [E, N], or None when the call has no such bias."""
    return b.op("Gather", bias, b.const(expert), axis=0) if bias in present else None


def add_expert(b: Body, spec: CallSpec, y: str, routing: tuple, expert: int, present: list[str]) -> str:
    """y plus expert `expert`'s weighted output at its tokens (the first `limit` pairs when limited)."""
    a, dtype = spec.attrs, spec.operands[0].np_dtype
    flat_weights, experts, limit = routing
    pairs = b.op("NonZero", b.op("Equal", experts, b.const(expert)))
    if limit:
        pairs = b.op("Slice", pairs, b.ints(0), limit, b.ints(1))
    token, slot = b.op("Gather", pairs, b.const(0), axis=0), b.op("Gather", pairs, b.const(1), axis=0)
    weight = b.op("Gather", flat_weights, b.op("Add", b.op("Mul", token, b.const(a["top_k"])), slot))
    rows = b.op("Gather", "hidden", token, axis=0)
    out = expert_mlp(b, rows, b.op("Gather", "w_gate_up", b.const(expert), axis=0),
                     b.op("Gather", "w_down", b.const(expert), axis=0), a, dtype,
                     expert_bias(b, "b_gate_up", present, expert), expert_bias(b, "b_down", present, expert))
    out = b.op("Mul", out, b.op("Unsqueeze", weight, b.ints(1)))
    return b.op("ScatterND", y, b.op("Unsqueeze", token, b.ints(1)), out, reduction="add")


def moe_function(spec: CallSpec):
    a = spec.attrs
    present = list(given_operands(spec))
    b = Body("moe", spec.key(), list(INPUTS[:len(spec.operands)]), sorted(a), spec.opset)
    hidden = spec.operands[0]
    hidden.static_dim(1, f"moe node '{spec.node}': hidden")   # tokens may be dynamic, the width may not
    num_experts = spec.operands[1].static_dim(1, f"moe node '{spec.node}': router_logits")
    dtype = hidden.np_dtype
    routing = (*route(b, spec, present, num_experts), capacity_limit(b, spec, num_experts))
    zero = numpy_helper.from_array(np.zeros(1, dtype=dtype), "zero")
    y = b.op("ConstantOfShape", b.op("Shape", "hidden"), value=zero)
    for e in range(num_experts):
        y = add_expert(b, spec, y, routing, e, present)
    if "shared_down" in present:   # expert biases are the routed experts' only
        shared = expert_mlp(b, "hidden", "shared_gate_up", "shared_down", a, dtype)
        if "shared_gate" in present:
            gate = b.op("Sigmoid", b.op("MatMul", "hidden", b.op("Transpose", "shared_gate", perm=[1, 0])))
            shared = b.op("Mul", shared, gate)
        y = b.op("Add", y, shared)
    return b.finish([y])
