"""Function bodies of `sparsecc::block_layout` and `sparsecc::block_attention` in standard ONNX.

block_layout: count visible elements per (query block, key block) of the
zero-padded mask; full = all visible, partial = some; each row of flags is
compacted by TopK(smallest) of  (not flag) * NK + column,  which lists the
flagged blocks first, ascending, then the rest (the runtime's stable argsort).
Policy window ANDs the flags with the blocks the band and the sinks reach, computed from
the lengths at run time; policy topk with the blocks its pooled scores choose
(`functions_attention_policies`). `sparsecc::rule_layout` (`functions_attention_rule`)
narrows its rule's block states the same way (`narrowed_layout`).

block_attention: the listed block states expanded to elements,
visible = full | (partial & rule), rule = the mask, the rule (rule_rows op rule_cols per term,
never S x Skv until here) or the causal rule, then fp32 softmax(q k^T * scale + (0 | -inf)) v
with kv head h // (Hq/Hkv) per query head; rows that see no key are filled as
`empty_rows` says. The function states the semantics; it computes every block. Batch and
sequence lengths are read at run time (a dynamic S works) except under threshold skipping.
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
from sparsecc.runtime.ops.block_layout import POLICIES

from .attention_heads import length, repeat_heads, slots
from .body import Body
from .functions_attention_policies import threshold_kept, topk_kept, window_reach
from .functions_attention_rule import rule_layout_inputs, rule_states, rule_visible, stacked_rule
from .spec import CallSpec

LAYOUT_OUTPUTS = ("kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices")
ATTENTION_INPUTS = ("q", "k", "v", "kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices", "mask",
                    "sinks", "rule_rows", "rule_cols")


def as_4d(b: Body, x: str, rank: int) -> str:
    """x viewed as 4-d by leading unit dims (its own dims may be symbolic)."""
    return x if rank == 4 else b.op("Unsqueeze", x, b.ints(*range(4 - rank)))


def compact(b: Body, flags: str) -> tuple[str, str]:
    """(count int32 [..], indices int32 [.., NK]) of bool flags [.., NK] (NK read at run time)."""
    nk = b.op("Shape", flags, start=-1)
    count = b.op("ReduceSum", b.op("Cast", flags, to=TensorProto.INT32), b.ints(-1), keepdims=0)
    columns = slots(b, nk)
    key = b.op("Add", b.op("Mul", b.op("Cast", b.op("Not", flags), to=TensorProto.INT64), nk), columns)
    _, order = b.op("TopK", key, nk, axis=-1, largest=0, sorted=1, outputs=2)
    return count, b.op("Cast", order, to=TensorProto.INT32)


def block_layout_function(spec: CallSpec):
    a = spec.attrs
    bq, bk, policy = a["block_q"], a["block_k"], a.get("policy", "mask")
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} has no ONNX function form")
    if policy == "topk" and (spec.operand(1) is None or spec.operand(2) is None):
        raise ValueError("policy topk needs its q and k inputs")
    b = Body("block_layout", spec.key(), ["mask", "q", "k"][:len(spec.operands)], sorted(a), spec.opset)
    mask = spec.operands[0].static(f"block_layout node '{spec.node}': mask")
    (bm, hm, s, skv) = (1,) * (4 - len(mask)) + tuple(mask)
    nq, nk = math.ceil(s / bq), math.ceil(skv / bk)
    counts = b.op("Pad", b.op("Cast", as_4d(b, "mask", len(mask)), to=TensorProto.INT32),
                  b.ints(0, 0, 0, 0, 0, 0, nq * bq - s, nk * bk - skv))
    counts = b.op("ReduceSum", b.op("Reshape", counts, b.ints(bm, hm, nq, bq, nk, bk)), b.ints(3, 5), keepdims=0)
    full = b.op("Equal", counts, b.const(bq * bk, np.int32))
    visible = b.op("Greater", counts, b.const(0, np.int32))
    return b.finish(narrowed_layout(b, spec, visible, full, b.const(s), b.const(skv), q_slot=1))


def rule_layout_function(spec: CallSpec):
    a = spec.attrs
    if a.get("policy", "mask") not in POLICIES:
        raise ValueError(f"policy {a['policy']!r} has no ONNX function form")
    b = Body("rule_layout", spec.key(), rule_layout_inputs(spec), sorted(a), spec.opset)
    rows, cols, seq, keys = stacked_rule(b, spec)
    visible, full = rule_states(b, rows, cols, a["ops"], seq, keys, a["block_q"], a["block_k"])
    return b.finish([*narrowed_layout(b, spec, visible, full, seq, keys, q_slot=2), rows, cols])


def narrowed_layout(b: Body, spec: CallSpec, visible: str, full: str, seq: str, keys: str,
                    q_slot: int) -> list[str]:
    """The four layout outputs of the blocks visible / full [Bm, Hm, NQ, NK], narrowed by the call's
    policy (0-d lengths seq, keys); policy topk reads the body's inputs 'q' and 'k', operands q_slot and
    q_slot + 1."""
    a = spec.attrs
    bq, bk, policy = a["block_q"], a["block_k"], a.get("policy", "mask")
    if policy == "window":
        reach = window_reach(b, seq, keys, a["window"], a.get("sinks", 0), bq, bk)
        full, visible = b.op("And", full, reach), b.op("And", visible, reach)
    partial = b.op("And", visible, b.op("Not", full))
    if policy == "topk":
        kept = topk_kept(b, spec, visible, spec.operand(q_slot), spec.operand(q_slot + 1))
        full, partial = b.op("And", full, kept), b.op("And", partial, kept)
    return [*compact(b, partial), *compact(b, full)]


def _block_states(b: Body, num: str, idx: str) -> str:
    """[Bm, Hm, NQ, NK] bool: the blocks the first `num` entries of each row of `idx` list."""
    nk = b.op("Shape", idx, start=-1)
    columns = slots(b, nk)
    valid = b.op("Less", columns, b.op("Unsqueeze", b.op("Cast", num, to=TensorProto.INT64), b.ints(-1)))
    listed = b.op("Where", valid, b.op("Cast", idx, to=TensorProto.INT64), nk)   # unlisted: a spill column
    zero = numpy_helper.from_array(np.zeros(1, dtype=np.int32), "zero")
    dense = b.op("ConstantOfShape", b.op("Concat", b.op("Shape", num), b.op("Add", nk, b.ints(1)), axis=0),
                 value=zero)
    ones = b.op("Expand", b.const(1, np.int32), b.op("Shape", listed))
    dense = b.op("ScatterElements", dense, listed, ones, axis=3)
    return b.op("Cast", b.op("Slice", dense, b.ints(0), nk, b.ints(3)), to=TensorProto.BOOL)


def _elements(b: Body, blocks: str, bq: int, bk: int, seq: str, keys: str) -> str:
    """[B, H, S, Skv] bool: each block's state of blocks [B, H, NQ, NK] repeated over its elements
    (Expand by 1 and Reshape by 0 keep the other dims, static or not; S, Skv 0-d)."""
    cols = b.op("Expand", b.op("Unsqueeze", blocks, b.ints(4)), b.ints(1, 1, 1, 1, bk))
    cols = b.op("Reshape", cols, b.ints(0, 0, 0, -1))                                  # [B, H, NQ, NK * bk]
    grid = b.op("Expand", b.op("Unsqueeze", cols, b.ints(3)), b.ints(1, 1, 1, bq, 1))
    merged = b.op("Concat", b.op("Shape", cols, start=0, end=2), b.ints(-1), b.op("Shape", cols, start=3), axis=0)
    grid = b.op("Reshape", grid, merged)                                               # [B, H, NQ * bq, NK * bk]
    ends = b.op("Concat", *(b.op("Unsqueeze", n, b.ints(0)) for n in (seq, keys)), axis=0)
    return b.op("Slice", grid, b.ints(0, 0), ends, b.ints(2, 3))


def _causal(b: Body, seq: str, keys: str) -> str:
    """[S, Skv] bool: j <= i + Skv - S."""
    rows = b.op("Add", b.op("Range", b.const(0), seq, b.const(1)), b.op("Sub", keys, seq))
    return b.op("LessOrEqual", b.op("Range", b.const(0), keys, b.const(1)), b.op("Unsqueeze", rows, b.ints(1)))


def _partial_rule(b: Body, spec: CallSpec, seq: str, keys: str) -> str:
    """What decides a partial block's elements: the mask, the rule, or the causal rule."""
    ops = spec.operands
    if len(ops) > 7 and ops[7] is not None:
        return as_4d(b, "mask", ops[7].rank)
    if len(ops) > 9 and ops[9] is not None:
        return rule_visible(b, "rule_rows", "rule_cols", spec.attrs.get("rule_ops", ""))
    return _causal(b, seq, keys)


def block_attention_function(spec: CallSpec):
    a = spec.attrs
    ops = spec.operands
    where = f"block_attention node '{spec.node}'"
    for i, name in enumerate("qkv"):   # heads and head dims shape the body; batch and lengths may be symbolic
        ops[i].static_dim(1, f"{where}: {name}"), ops[i].static_dim(3, f"{where}: {name}")
    hq, k_shape, v_shape = ops[0].shape[1], ops[1].shape, ops[2].shape
    b = Body("block_attention", spec.key(), list(ATTENTION_INPUTS[:len(ops)]), sorted(a), spec.opset)
    seq, keys = length(b, "q", 2), length(b, "k", 2)
    full = _elements(b, _block_states(b, "full_num_blocks", "full_indices"), a["block_q"], a["block_k"], seq, keys)
    partial = _elements(b, _block_states(b, "kv_num_blocks", "kv_indices"), a["block_q"], a["block_k"], seq, keys)
    visible = b.op("Or", full, b.op("And", partial, _partial_rule(b, spec, seq, keys)))
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
        kept = _elements(b, kept, a["block_q"], a["block_k"], seq, keys)
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
