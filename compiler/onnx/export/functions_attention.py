"""Function bodies of `sparsecc::block_layout` and `sparsecc::block_attention` in standard ONNX.

block_layout: count visible elements per (query block, key block) of the
zero-padded mask; full = all visible, partial = some; each row of flags is
compacted by TopK(smallest) of  (not flag) * NK + column,  which lists the
flagged blocks first, ascending, then the rest (the runtime's stable argsort).
Policy window ANDs the flags with the band fixed at export time; policy topk
with the blocks its pooled scores choose (`functions_attention_policies`).

block_attention: the listed block states expanded to elements,
visible = full | (partial & rule), then fp32 softmax(q k^T * scale + (0 | -inf)) v
with kv head h // (Hq/Hkv) per query head; rows that see no key are filled as
`empty_rows` says. The function states the semantics; it computes every block.
threshold > 0 first drops the blocks the BLASST rule skips (`functions_attention_policies`).
softcap > 0 caps the scores as softcap * Tanh(scores / softcap) before the mask; sinks [Hq] join each
row's softmax as one more logit with a zero value vector:

    m = max(max_j l_j, sink),   out = sum_j exp(l_j - m) v_j / (sum_j exp(l_j - m) + exp(sink - m))

so no row is empty with sinks (one that sees no key gives 0).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper

from .attention_heads import repeat_heads
from .body import Body
from .functions_attention_policies import threshold_kept, topk_kept
from .spec import CallSpec

LAYOUT_OUTPUTS = ("kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices")
ATTENTION_INPUTS = ("q", "k", "v", "kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices", "mask",
                    "sinks")


def _as_4d(b: Body, x: str, shape: tuple) -> tuple[str, tuple]:
    if len(shape) == 4:
        return x, shape
    full = (1,) * (4 - len(shape)) + tuple(shape)
    return b.op("Reshape", x, b.ints(*full)), full


def _compact(b: Body, flags: str, nk: int) -> tuple[str, str]:
    count = b.op("ReduceSum", b.op("Cast", flags, to=TensorProto.INT32), b.ints(-1), keepdims=0)
    key = b.op("Add", b.op("Mul", b.op("Cast", b.op("Not", flags), to=TensorProto.INT64), b.const(nk)),
               b.const(np.arange(nk)))
    _, order = b.op("TopK", key, b.ints(nk), axis=-1, largest=0, sorted=1, outputs=2)
    return count, b.op("Cast", order, to=TensorProto.INT32)


def window_reach(seq: int, keys: int, window: int, sinks: int, block_q: int, block_k: int) -> np.ndarray:
    """[NQ, NK] blocks the window policy may keep: the band, and causally reachable sink blocks
    (`sparsecc.runtime.attention_policies.window_layout_from_mask`, evaluated at export time)."""
    from sparsecc.runtime.attention_layout import causal_blocks
    from sparsecc.runtime.attention_policies import window_blocks
    reach = window_blocks(seq, keys, window, 0, block_q, block_k).clone()
    sink_blocks = min(math.ceil(sinks / block_k), reach.shape[1])
    reach[:, :sink_blocks] = causal_blocks(seq, keys, block_q, block_k, None)[0][:, :sink_blocks]
    return reach.numpy()


def block_layout_function(spec: CallSpec):
    a = spec.attrs
    bq, bk, policy = a["block_q"], a["block_k"], a.get("policy", "mask")
    if policy not in ("mask", "window", "topk"):
        raise ValueError(f"policy {policy!r} has no ONNX function form")
    if policy == "topk" and (spec.operand(1) is None or spec.operand(2) is None):
        raise ValueError("policy topk needs its q and k inputs")
    b = Body("block_layout", spec.key(), ["mask", "q", "k"][:len(spec.operands)], sorted(a), spec.opset)
    mask, (bm, hm, s, skv) = _as_4d(b, "mask", spec.operands[0].static(f"block_layout node '{spec.node}': mask"))
    nq, nk = math.ceil(s / bq), math.ceil(skv / bk)
    counts = b.op("Pad", b.op("Cast", mask, to=TensorProto.INT32), b.ints(0, 0, 0, 0, 0, 0, nq * bq - s, nk * bk - skv))
    counts = b.op("ReduceSum", b.op("Reshape", counts, b.ints(bm, hm, nq, bq, nk, bk)), b.ints(3, 5), keepdims=0)
    full = b.op("Equal", counts, b.const(bq * bk, np.int32))
    visible = b.op("Greater", counts, b.const(0, np.int32))
    if policy == "window":
        reach = b.const(window_reach(s, skv, a["window"], a["sinks"], bq, bk), np.bool_)
        full, visible = b.op("And", full, reach), b.op("And", visible, reach)
    partial = b.op("And", visible, b.op("Not", full))
    if policy == "topk":
        kept = topk_kept(b, spec, visible, s, skv)
        full, partial = b.op("And", full, kept), b.op("And", partial, kept)
    kv_num, kv_idx = _compact(b, partial, nk)
    full_num, full_idx = _compact(b, full, nk)
    return b.finish([kv_num, kv_idx, full_num, full_idx])


def _block_states(b: Body, num: str, idx: str, nk: int) -> str:
    """[Bm, Hm, NQ, NK] bool: the blocks the first `num` entries of each row of `idx` list."""
    valid = b.op("Less", b.const(np.arange(nk), np.int32), b.op("Unsqueeze", num, b.ints(-1)))
    slots = b.op("Where", valid, b.op("Cast", idx, to=TensorProto.INT64), b.const(nk))
    zero = numpy_helper.from_array(np.zeros(1, dtype=np.int32), "zero")
    dense = b.op("ConstantOfShape", b.op("Concat", b.op("Shape", num), b.ints(nk + 1), axis=0), value=zero)
    ones = b.op("Expand", b.const(1, np.int32), b.op("Shape", slots))
    dense = b.op("ScatterElements", dense, slots, ones, axis=3)
    return b.op("Cast", b.op("Slice", dense, b.ints(0), b.ints(nk), b.ints(3)), to=TensorProto.BOOL)


def _elements(b: Body, blocks: str, nq: int, nk: int, bq: int, bk: int, s: int, skv: int) -> str:
    """[B, H, S, Skv] bool: each block's state of blocks [B, H, NQ, NK] repeated over its elements
    (Expand by 1 and Reshape by 0 keep the leading dims, static or not)."""
    grid = b.op("Expand", b.op("Unsqueeze", blocks, b.ints(3, 5)), b.ints(1, 1, nq, bq, nk, bk))
    grid = b.op("Reshape", grid, b.ints(0, 0, nq * bq, nk * bk))
    return b.op("Slice", grid, b.ints(0, 0), b.ints(s, skv), b.ints(2, 3))


def _causal(b: Body, s: int, skv: int) -> str:
    rows = b.const(np.arange(s)[:, None] + (skv - s))
    return b.op("LessOrEqual", b.const(np.arange(skv)[None, :]), rows)


def block_attention_function(spec: CallSpec):
    a = spec.attrs
    ops = spec.operands
    where = f"block_attention node '{spec.node}'"
    q_shape, k_shape, v_shape = (ops[i].static_but_batch(f"{where}: {n}") for i, n in enumerate("qkv"))
    (_, hq, s, _), skv = q_shape, k_shape[2]
    nq, nk = ops[4].shape[2], ops[4].shape[3]
    b = Body("block_attention", spec.key(), list(ATTENTION_INPUTS[:len(ops)]), sorted(a), spec.opset)
    full = _elements(b, _block_states(b, "full_num_blocks", "full_indices", nk), nq, nk,
                     a["block_q"], a["block_k"], s, skv)
    partial = _elements(b, _block_states(b, "kv_num_blocks", "kv_indices", nk), nq, nk,
                        a["block_q"], a["block_k"], s, skv)
    rule = _as_4d(b, "mask", ops[7].shape)[0] if len(ops) > 7 and ops[7] is not None else _causal(b, s, skv)
    visible = b.op("Or", full, b.op("And", partial, rule))
    f32 = lambda x: b.op("Cast", x, to=TensorProto.FLOAT)
    k = repeat_heads(b, f32("k"), k_shape, hq)
    v = repeat_heads(b, f32("v"), v_shape, hq)
    scores = b.op("Mul", b.op("MatMul", f32("q"), b.op("Transpose", k, perm=[0, 1, 3, 2])),
                  b.const(a["scale"], np.float32))
    if a.get("softcap", 0.0) > 0:
        cap = b.const(a["softcap"], np.float32)
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)
    if a.get("threshold", 0.0) > 0:
        kept = threshold_kept(b, spec, scores, visible)
        kept = _elements(b, kept, nq, nk, a["block_q"], a["block_k"], s, skv)
        visible = b.op("And", visible, kept)
    bias = b.op("Where", visible, b.const(0.0, np.float32), b.const(-np.inf, np.float32))
    if len(ops) > 8 and ops[8] is not None:
        return b.finish([b.op("Cast", _with_sinks(b, b.op("Add", scores, bias), v, hq), to=ops[0].elem_type)])
    out = b.op("MatMul", b.op("Softmax", b.op("Add", scores, bias), axis=-1), v)
    seen = b.op("Greater", b.op("ReduceMax", b.op("Cast", visible, to=TensorProto.INT32), b.ints(-1), keepdims=1),
                b.const(0, np.int32))
    fill = {"zero": lambda: b.const(0.0, np.float32), "nan": lambda: b.const(np.nan, np.float32),
            "uniform": lambda: b.op("ReduceMean", v, b.ints(2), keepdims=1)}[a["empty_rows"]]()
    out = b.op("Where", seen, out, fill)
    return b.finish([b.op("Cast", out, to=ops[0].elem_type)])


def _with_sinks(b: Body, logits: str, v: str, heads: int) -> str:
    """softmax over [logits, sink] (sink [Hq] per head, value vector 0) times v; the max keeps exp finite."""
    sink = b.op("Reshape", b.op("Cast", "sinks", to=TensorProto.FLOAT), b.ints(1, heads, 1, 1))
    top = b.op("Max", b.op("ReduceMax", logits, b.ints(-1), keepdims=1), sink)
    weights = b.op("Exp", b.op("Sub", logits, top))
    total = b.op("Add", b.op("ReduceSum", weights, b.ints(-1), keepdims=1), b.op("Exp", b.op("Sub", sink, top)))
    return b.op("Div", b.op("MatMul", weights, v), total)
