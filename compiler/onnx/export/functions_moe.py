"""Function body of `sparsecc::moe` in standard ONNX: route, then one unrolled branch per expert.

    weights, experts = TopK(Softmax|Sigmoid(router_logits), top_k)     (normalised if asked)
    for e in 0..E-1:    pairs  = NonZero(experts == e)          [2, c]: (token, slot), token order
                        (first ceil(cf*T*k/E) pairs when capacity_factor > 0; in float64
                        in the graph when the token count T is dynamic)
                        y     += ScatterND(add) at token of  w[token, slot] * expert_e(hidden[token])
    y += shared(hidden) * Sigmoid(hidden @ shared_gate.T)            (when given)

Every expert reads only its own tokens, so the work is T*k expert MLPs, as in the
sparse op; Gather(w, e) of a constant weight is folded by onnxruntime at load.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper

from .body import Body
from .spec import CallSpec

INPUTS = ("hidden", "router_logits", "w_gate_up", "w_down", "shared_gate_up", "shared_down", "shared_gate")


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


def expert_mlp(b: Body, rows: str, gate_up: str, down: str, act: str, gated: bool, dtype) -> str:
    """act(rows @ gate.T) * (rows @ up.T) @ down.T (gated), else act(rows @ gate_up.T) @ down.T."""
    projected = b.op("MatMul", rows, b.op("Transpose", gate_up, perm=[1, 0]))
    if gated:
        gate, up = b.op("Split", projected, axis=1, num_outputs=2, outputs=2)
        hidden = b.op("Mul", activation(b, gate, act, dtype), up)
    else:
        hidden = activation(b, projected, act, dtype)
    return b.op("MatMul", hidden, b.op("Transpose", down, perm=[1, 0]))


def route(b: Body, spec: CallSpec, dtype) -> tuple[str, str]:
    """(flat weights [T*k] in hidden's dtype, experts [T, k] int64)."""
    a = spec.attrs
    logits = b.op("Cast", "router_logits", to=TensorProto.FLOAT)
    scores = b.op("Softmax", logits, axis=-1) if a["scoring"] == "softmax" else b.op("Sigmoid", logits)
    weights, experts = b.op("TopK", scores, b.ints(a["top_k"]), axis=-1, largest=1, sorted=1, outputs=2)
    if a["normalize"]:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints(-1), keepdims=1))
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


def moe_function(spec: CallSpec):
    a = spec.attrs
    present = [name for name, op in zip(INPUTS, spec.operands) if op is not None]
    b = Body("moe", spec.key(), list(INPUTS[:len(spec.operands)]), sorted(a), spec.opset)
    hidden = spec.operands[0]
    hidden.static_dim(1, f"moe node '{spec.node}': hidden")   # tokens may be dynamic, the width may not
    num_experts = spec.operands[1].static_dim(1, f"moe node '{spec.node}': router_logits")
    dtype = hidden.np_dtype
    flat_weights, experts = route(b, spec, dtype)
    limit = capacity_limit(b, spec, num_experts)
    zero = numpy_helper.from_array(np.zeros(1, dtype=dtype), "zero")
    y = b.op("ConstantOfShape", b.op("Shape", "hidden"), value=zero)
    for e in range(num_experts):
        pairs = b.op("NonZero", b.op("Equal", experts, b.const(e)))
        if limit:
            pairs = b.op("Slice", pairs, b.ints(0), limit, b.ints(1))
        token, slot = b.op("Gather", pairs, b.const(0), axis=0), b.op("Gather", pairs, b.const(1), axis=0)
        weight = b.op("Gather", flat_weights, b.op("Add", b.op("Mul", token, b.const(a["top_k"])), slot))
        rows = b.op("Gather", "hidden", token, axis=0)
        out = expert_mlp(b, rows, b.op("Gather", "w_gate_up", b.const(e), axis=0),
                         b.op("Gather", "w_down", b.const(e), axis=0), a["activation"], bool(a["gated"]), dtype)
        out = b.op("Mul", out, b.op("Unsqueeze", weight, b.ints(1)))
        y = b.op("ScatterND", y, b.op("Unsqueeze", token, b.ints(1)), out, reduction="add")
    if "shared_down" in present:
        shared = expert_mlp(b, "hidden", "shared_gate_up", "shared_down", a["activation"], bool(a["gated"]), dtype)
        if "shared_gate" in present:
            gate = b.op("Sigmoid", b.op("MatMul", "hidden", b.op("Transpose", "shared_gate", perm=[1, 0])))
            shared = b.op("Mul", shared, gate)
        y = b.op("Add", y, shared)
    return b.finish([y])
