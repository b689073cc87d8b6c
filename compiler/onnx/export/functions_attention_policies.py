"""Function bodies of the data-dependent attention policies, in standard ONNX (`functions_attention` calls them).

window (`block_layout`, `rule_layout`): the blocks `window_reach` keeps, from the lengths at run time.

topk (`block_layout`, `rule_layout`, `sparsecc.runtime.attention_policies.topk_layout_from_states`):
    scores  = mean(q block) . mean(k block)  fp32 [B, Hq, NQ, NK]; rows past S or Skv are zeros
              in the sums and a ragged last block divides by its own row count; kv head h // (Hq/Hkv)
    forced  = (sink or diagonal block, both fixed at export time) and visible
    ranked  = +inf where forced, -inf where not visible, else the score
    budget  = max(1, ceil(float32(visible count) * topk)) for a fraction, else int(topk)
    kept    = (position of the block in TopK(ranked) < budget and visible) or forced
TopK breaks ties by the lower index (the ONNX rule, measured in onnxruntime 1.32), which is torch's
stable descending argsort; blocks whose scores differ only by rounding may still rank differently.

threshold (`block_attention`, BLASST; `sparsecc.runtime.ops.block_attention`): per (batch, query
head, query block) the listed blocks are visited in the order full (ascending), then partial
(ascending); a block is skipped when for every row r  max_j logit(r, j) - m_r < log(threshold),
m_r the running maximum of the blocks kept so far. An ONNX Loop over the NK visiting steps carries
m [B, Hq, NQ, block_q]: O(NK) iterations of O(B * Hq * S) work over block maxima computed once
from the dense logits (O(B * Hq * S * Skv)); the graph size does not grow with NK.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from .attention_heads import batch_shape, block_bounds, repeat_heads
from .body import Body
from .spec import CallSpec, Operand

NEG_INF = -np.inf


class _LoopBody(Body):
    """A Loop body's nodes: its value names are prefixed so they never shadow the function's own."""

    def _fresh(self, hint: str) -> str:
        return "blasst_" + super()._fresh(hint)


def _block_means(b: Body, x: str, shape: tuple, block: int) -> str:
    """[B, H, N, D] fp32 means of blocks of rows of x [B, H, L, D] (zero-padded; a ragged block over its rows)."""
    _, heads, length, dim = shape
    n = math.ceil(length / block)
    padded = b.op("Pad", b.op("Cast", x, to=TensorProto.FLOAT), b.ints(0, 0, 0, 0, 0, 0, n * block - length, 0))
    sums = b.op("ReduceSum", b.op("Reshape", padded, b.ints(0, heads, n, block, dim)), b.ints(3), keepdims=0)
    sizes = np.minimum(length - np.arange(n) * block, block).astype(np.float32)[:, None]
    return b.op("Div", sums, b.const(sizes, np.float32))


def window_reach(b: Body, seq: str, keys: str, window: int, sinks: int, block_q: int, block_k: int) -> str:
    """[NQ, NK] bool, for 0-d lengths read at run time: the causal key blocks holding a key of the band
    i' - window < j <= i' (i' = i + Skv - S) of some row of the query block, or a key j < sinks
    (`sparsecc.runtime.attention_layout.window_blocks`)."""
    q_first, q_last = (b.op("Unsqueeze", x, b.ints(1)) for x in block_bounds(b, seq, block_q))   # [NQ, 1]
    k_first, k_last = block_bounds(b, keys, block_k)                                            # [NK]
    own_first, own_last = (b.op("Add", x, b.op("Sub", keys, seq)) for x in (q_first, q_last))
    causal = b.op("LessOrEqual", k_first, own_last)
    low = b.op("Max", k_first, b.op("Add", own_first, b.const(1 - window)))
    in_window = b.op("LessOrEqual", low, b.op("Min", k_last, own_last))
    return b.op("And", causal, b.op("Or", in_window, b.op("Less", k_first, b.const(sinks))))


def _forced_blocks(seq: int, keys: int, sinks: int, block_q: int, block_k: int) -> np.ndarray:
    """[NQ, NK] sink and diagonal blocks, evaluated at export time as the runtime computes them."""
    from sparsecc.runtime.attention_layout import diagonal_blocks
    diagonal = diagonal_blocks(seq, keys, block_q, block_k, None).numpy()
    return diagonal | (np.arange(diagonal.shape[1]) < math.ceil(sinks / block_k))[None, :]


def _budget(b: Body, visible: str, topk: float) -> str:
    """int64 [Bm, Hm, NQ, 1]: blocks to keep per row (`attention_policies.topk_budget`, in float32 as torch)."""
    if topk >= 1:
        return b.const(np.full((1, 1, 1, 1), int(topk)))
    count = b.op("ReduceSum", b.op("Cast", visible, to=TensorProto.FLOAT), b.ints(-1), keepdims=1)
    wanted = b.op("Ceil", b.op("Mul", count, b.const(topk, np.float32)))
    return b.op("Cast", b.op("Max", wanted, b.const(1.0, np.float32)), to=TensorProto.INT64)


def topk_kept(b: Body, spec: CallSpec, visible: str, q: Operand, k: Operand) -> str:
    """Bool [B, Hq, NQ, NK]: the key blocks the topk policy keeps, given the visible blocks; q and k are the
    body's inputs 'q' and 'k', static but for the batch (the pooled scores are shaped by S and Skv)."""
    a, where = spec.attrs, f"{spec.op} node '{spec.node}'"
    q_shape, k_shape = q.static_but_batch(f"{where}: q"), k.static_but_batch(f"{where}: k")
    seq, keys = q_shape[2], k_shape[2]
    bq, bk = a["block_q"], a["block_k"]
    nq, nk = math.ceil(seq / bq), math.ceil(keys / bk)
    k_means = repeat_heads(b, _block_means(b, "k", k_shape, bk), (k_shape[0], k_shape[1], nk, k_shape[3]),
                            q_shape[1])
    scores = b.op("MatMul", _block_means(b, "q", q_shape, bq), b.op("Transpose", k_means, perm=[0, 1, 3, 2]))
    forced = b.op("And", b.const(_forced_blocks(seq, keys, a.get("sinks", 0), bq, bk), np.bool_), visible)
    ranked = b.op("Where", forced, b.const(np.inf, np.float32), scores)
    ranked = b.op("Where", visible, ranked, b.const(NEG_INF, np.float32))
    _, order = b.op("TopK", ranked, b.ints(nk), axis=-1, largest=1, sorted=1, outputs=2)
    in_budget = b.op("Less", b.const(np.arange(nk)), _budget(b, visible, a["topk"]))   # by sorted position
    in_budget = b.op("Cast", b.op("Expand", in_budget, b.op("Shape", order)), to=TensorProto.INT32)
    zeros = b.op("Expand", b.const(0, np.int32), batch_shape(b, q_shape[0], "q", q_shape[1], nq, nk))
    chosen = b.op("Cast", b.op("ScatterElements", zeros, order, in_budget, axis=3), to=TensorProto.BOOL)
    return b.op("Or", b.op("And", chosen, visible), forced)


def _log_threshold(threshold: float) -> np.float32:
    """float32(log(threshold)) as the runtime compares it. The attribute is float32; its shortest decimal
    (e.g. 0.0001) gives back the double the model was compiled with, so the log is rounded once, as torch's."""
    return np.float32(math.log(float(str(np.float32(threshold)))))


def _visiting_order(b: Body, nk: int) -> tuple[str, str]:
    """(block at step t int64, step t listed bool) [Bm, Hm, NQ, NK]: full blocks, then partial ones."""
    steps = b.const(np.arange(nk))
    full_num = b.op("Unsqueeze", b.op("Cast", "full_num_blocks", to=TensorProto.INT64), b.ints(-1))
    kv_num = b.op("Unsqueeze", b.op("Cast", "kv_num_blocks", to=TensorProto.INT64), b.ints(-1))
    in_partial = b.op("Clip", b.op("Sub", steps, full_num), b.const(0), b.const(nk - 1))
    partial = b.op("GatherElements", b.op("Cast", "kv_indices", to=TensorProto.INT64), in_partial, axis=3)
    order = b.op("Where", b.op("Less", steps, full_num), b.op("Cast", "full_indices", to=TensorProto.INT64),
                 partial)
    return order, b.op("Less", steps, b.op("Add", full_num, kv_num))


def _skip_loop_body(log_threshold: np.float32, ordered_max: str, listed: str) -> helper.GraphProto:
    """One visiting step: keep iff max over rows of (block max - running max) >= log(threshold)."""
    g = _LoopBody("step", "", [], [], 0)
    this_max = g.op("Gather", ordered_max, "blasst_step", axis=4)                            # [B, Hq, NQ, bq]
    gap = g.op("Where", g.op("Equal", this_max, g.const(NEG_INF, np.float32)), g.const(NEG_INF, np.float32),
               g.op("Sub", this_max, "blasst_run_max"))
    keep = g.op("GreaterOrEqual", g.op("ReduceMax", gap, g.ints(3), keepdims=0), g.const(log_threshold, np.float32))
    update = g.op("Unsqueeze", g.op("And", keep, g.op("Gather", listed, "blasst_step", axis=3)), g.ints(3))
    new_max = g.op("Where", update, g.op("Max", "blasst_run_max", this_max), "blasst_run_max")
    cond_out = g.op("Identity", "blasst_cond")
    tensor = helper.make_tensor_value_info
    return helper.make_graph(
        g.nodes, "blasst_step",
        [tensor("blasst_step", TensorProto.INT64, []), tensor("blasst_cond", TensorProto.BOOL, []),
         tensor("blasst_run_max", TensorProto.FLOAT, None)],
        [tensor(cond_out, TensorProto.BOOL, []), tensor(new_max, TensorProto.FLOAT, None),
         tensor(keep, TensorProto.BOOL, None)])


def threshold_kept(b: Body, spec: CallSpec, scores: str, visible: str) -> str:
    """Bool [B, Hq, NQ, NK]: the listed key blocks the BLASST rule visits (the others are skipped)."""
    a, ops = spec.attrs, spec.operands
    batch, heads, seq, keys = ops[0].shape[0], ops[0].shape[1], ops[0].shape[2], ops[1].shape[2]
    bq, bk = a["block_q"], a["block_k"]
    nq, nk = ops[4].shape[2], ops[4].shape[3]
    logits = b.op("Where", visible, scores, b.const(NEG_INF, np.float32))
    padded = b.op("Pad", logits, b.ints(0, 0, 0, 0, 0, 0, nq * bq - seq, nk * bk - keys),
                  b.const(NEG_INF, np.float32))
    block_max = b.op("ReduceMax", b.op("Reshape", padded, b.ints(0, heads, nq, bq, nk, bk)), b.ints(5),
                     keepdims=0)                                                       # [B, Hq, NQ, bq, NK]
    order, listed = _visiting_order(b, nk)
    order = b.op("Expand", order, batch_shape(b, batch, "q", heads, nq, nk))
    ordered_max = b.op("GatherElements", block_max,
                       b.op("Expand", b.op("Unsqueeze", order, b.ints(3)), b.ints(1, 1, 1, bq, 1)), axis=4)
    start = b.op("Expand", b.const(NEG_INF, np.float32), batch_shape(b, batch, "q", heads, nq, bq))
    body = _skip_loop_body(_log_threshold(a["threshold"]), ordered_max, listed)
    _, keep = b.op("Loop", b.const(nk), "", start, outputs=2, body=body)                 # keep [NK, B, Hq, NQ]
    visited = b.op("And", b.op("Transpose", keep, perm=[1, 2, 3, 0]), listed)           # in visiting order
    slots = b.op("Where", listed, order, b.const(nk))                                   # unlisted: spill column
    blocks = b.op("Expand", b.const(0, np.int32), batch_shape(b, batch, "q", heads, nq, nk + 1))
    kept = b.op("ScatterElements", blocks, slots, b.op("Cast", visited, to=TensorProto.INT32), axis=3)
    return b.op("Cast", b.op("Slice", kept, b.ints(0), b.ints(nk), b.ints(3)), to=TensorProto.BOOL)
