"""onnxruntime attention contrib ops for `block_attention` (and its block_layout or rule_layout) where they compute
the same thing.

What a `block_attention` node attends to, visible[h, i, j] = full | (partial & rule)
(`sparsecc.runtime.ops.block_attention.visible_elements`), is evaluated at export
time when its layout and mask or rule follow from constants (`attention_attended`:
a causal or window mask or rule built from `arange` does, a layout folded at compile
time does; a padding mask from a graph input does not), and compared element by element with what each contrib op attends to (measured in
onnxruntime 1.32 CPU against a float64 reference, see docs/onnx.md):

    GroupQueryAttention(local_window_size=W)   i - W < j <= i (W = -1: j <= i), one band for every head;
                                               softcap and head_sink carry the op's softcap and sinks
    SparseAttention(sparse_block_size=b)       j <= i and block (i // b, j // b) listed in the block-CSR
                                               layout of head h (layout h % L; L = 1 or Hq)

GroupQueryAttention is taken when both fit (it needs no buffers bound). Both
need: S == Skv (prompt form, no cache), q, k, v of one dtype, float32 or
float16, v's head dim equal to q's, scale != 0 (0 means 1/sqrt(D) to both ops),
no threshold skipping, the same elements for every batch row, and every query
row seeing some key (both ops would average over keys the sparse op hides). SparseAttention also needs block_q ==
block_k, a head dim that is a multiple of 8, no softcapping and no sink logits.

SparseAttention on CPU runs only with past_key/present_key (and the values) in
one buffer: each such node gets graph inputs `<node>.past_key` and
`<node>.past_value` [B, Hkv, S, D] and graph outputs `<node>.present_key` and
`<node>.present_value`, listed as [input, output] pairs in the model metadata
`sparsecc.shared_buffers`; `sparsecc.onnx.runner.OnnxRunner` binds each pair to
one zeroed buffer. With S == Skv the op reads nothing from the buffer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto
from onnxscript import ir

from .attention_attended import attended, layout_producer, node_attrs
from .body import DOMAIN
from .contrib import CONTRIB
from ..runner import SHARED_BUFFERS

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
_NEITHER = "GroupQueryAttention (local_window_size band) and SparseAttention (static causal block-CSR) do not fit"


@dataclass(frozen=True)
class AttentionFit:
    op: str                              # "GroupQueryAttention" or "SparseAttention"
    window: int = -1                     # GroupQueryAttention local_window_size
    blocks: np.ndarray | None = None  # SparseAttention: kept key blocks [L, NQ, NK] bool


@dataclass(frozen=True)
class AttentionCall:
    """A block_attention node's shapes: q [B, Hq, S, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv]."""
    batch: int | str                     # a symbolic batch keeps its name
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    dtype: int
    scale: float
    block: int                           # block_q: SparseAttention's sparse_block_size
    block_k: int
    softcap: float = 0.0                 # GroupQueryAttention's softcap (SparseAttention has none)
    sinks: bool = False                  # input 8 feeds GroupQueryAttention's head_sink (SparseAttention: none)


def attention_call(node: ir.Node) -> AttentionCall | str:
    """The node's shapes and attributes, or why no contrib op takes them."""
    a = node_attrs(node)
    if any(x is None or x.shape is None for x in node.inputs[:3]):
        return "q, k or v has no known shape"
    q, k, v = (tuple(x.shape) for x in node.inputs[:3])
    dtypes = {-1 if x.dtype is None else int(x.dtype) for x in node.inputs[:3]}
    if not all(isinstance(d, int) for d in q[1:] + k[1:] + v[1:]):
        return f"symbolic shapes q {list(q)}, k {list(k)}"
    q, k, v = ((str(x[0]) if not isinstance(x[0], int) else x[0], *x[1:]) for x in (q, k, v))
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATS:
        names = sorted("unknown" if d < 0 else ir.DataType(d).name for d in dtypes)
        return f"q, k, v dtypes {names} (both ops take one of float32, float16)"
    if q[2] != k[2]:
        return f"{q[2]} queries over {k[2]} keys (both ops take S == Skv without a cache)"
    if v[3] != q[3]:
        return f"v head dim {v[3]} != q head dim {q[3]}"
    if a.get("threshold", 0.0) > 0:
        return f"threshold={a['threshold']} skips blocks by the data at run time"
    if a["scale"] == 0.0:
        return "scale 0 (both ops read 0 as 1/sqrt(head dim))"
    sinks = node.inputs[8] if len(node.inputs) > 8 else None
    return AttentionCall(q[0], q[1], k[1], q[2], q[3], next(iter(dtypes)), float(a["scale"]), a["block_q"],
                         a["block_k"], float(a.get("softcap", 0.0)), sinks is not None)


def band_window(seen: np.ndarray) -> int | str:
    """GroupQueryAttention's local_window_size W when seen [Hm, S, S] is i - W < j <= i (-1: causal)."""
    if not (seen == seen[:1]).all():
        return "heads attend to different elements"
    seq = seen.shape[-1]
    width = int(seen[0].sum(-1).max())
    rows, cols = np.arange(seq)[:, None], np.arange(seq)[None, :]
    if not np.array_equal(seen[0], (cols <= rows) & (cols > rows - width)):
        return "the attended elements are not one causal band i - W < j <= i"
    return -1 if width >= seq else width


def causal_blocks(seen: np.ndarray, call: AttentionCall) -> np.ndarray | str:
    """SparseAttention's kept blocks [L, NQ, NK] when seen [Hm, S, S] is causal & whole blocks."""
    if call.head_dim % 8:
        return f"head dim {call.head_dim} is not a multiple of 8"
    if call.block_k != call.block:
        return f"block_q {call.block} != block_k {call.block_k}"
    seq, b = call.seq, call.block
    n = -(-seq // b)
    padded = np.zeros((seen.shape[0], n * b, n * b), bool)
    padded[:, :seq, :seq] = seen
    kept = padded.reshape(-1, n, b, n, b).any((2, 4))
    causal = np.arange(seq)[None, :] <= np.arange(seq)[:, None]
    whole = np.repeat(np.repeat(kept, b, 1), b, 2)[:, :seq, :seq] & causal
    if not np.array_equal(whole, seen):
        return "the attended elements are not causal over whole key blocks"
    return kept[:1] if (kept == kept[:1]).all() else kept


def fit_attention(node: ir.Node, opset: int, cache: dict) -> tuple[AttentionFit | str, ir.Node | None]:
    """(the contrib op that computes exactly what `node` does, or why none; its layout node, None when
    its layout is constant)."""
    producer = layout_producer(node)
    layout = producer if isinstance(producer, ir.Node) else None
    call = attention_call(node)
    if isinstance(call, str):
        return call, layout
    seen = attended(node, producer, opset, cache)
    if isinstance(seen, str):
        return seen, layout
    window = band_window(seen)
    if not isinstance(window, str):
        return AttentionFit("GroupQueryAttention", window=window), layout
    blocks = causal_blocks(seen, call)
    if not isinstance(blocks, str) and (call.softcap > 0 or call.sinks):
        blocks = "it has no logit softcapping or sink logits"
    if not isinstance(blocks, str) and not isinstance(call.batch, int):
        blocks = f"its past/present buffers, bound by the runner, need a static batch (got {call.batch!r})"
    if isinstance(blocks, str):
        policy = node_attrs(layout).get("policy", "mask") if layout is not None else "mask"
        staircase = " (the window policy keeps whole key blocks, a staircase)" if policy == "window" else ""
        return f"GroupQueryAttention: {window}{staircase}; SparseAttention: {blocks}", layout
    return AttentionFit("SparseAttention", blocks=blocks), layout


def misfit_line(node: ir.Node, reason: str) -> str:
    return f"block_attention '{node.name}': {_NEITHER} ({reason}); function form"


def _const(graph: ir.Graph, before: ir.Node, values: np.ndarray) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(values)})
    graph.insert_before(before, node)
    return node.outputs[0]


def _pack(graph: ir.Graph, before: ir.Node, x: ir.Value, call: AttentionCall, heads: int) -> ir.Value:
    """[B, H, S, D] -> [B, S, H * D], the contrib ops' layout (Reshape's 0 keeps B, static or not)."""
    swap = ir.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
    shape = _const(graph, before, np.array([0, call.seq, heads * call.head_dim], np.int64))
    merged = ir.node("Reshape", [swap.outputs[0], shape])
    graph.insert_before(before, [swap, merged])
    return merged.outputs[0]


def _unpack(graph: ir.Graph, node: ir.Node, packed: ir.Value, call: AttentionCall) -> None:
    """[B, S, Hq * D] -> [B, Hq, S, D] in place of node's output, which it then removes."""
    shape = _const(graph, node, np.array([0, call.seq, call.q_heads, call.head_dim], np.int64))
    split = ir.node("Reshape", [packed, shape])
    swap = ir.node("Transpose", [split.outputs[0]], {"perm": [0, 2, 1, 3]})
    graph.insert_before(node, [split, swap])
    out, new = node.outputs[0], swap.outputs[0]
    new.shape, new.dtype = out.shape, ir.DataType(call.dtype)   # q's dtype (the node may be untyped yet)
    is_output = out in graph.outputs
    if is_output:   # swapped first: onnx_ir refuses to replace the uses of a graph output
        graph.outputs[graph.outputs.index(out)] = new
    ir.convenience.replace_all_uses_with(out, new)
    graph.remove(node, safe=True)
    if is_output:   # a graph output keeps its name
        new.name = out.name


def _csr(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """block_row_indices [L, NQ + 1] and block_col_indices [L, max nnz] (rows padded with 0) of [L, NQ, NK]."""
    rows = np.zeros((blocks.shape[0], blocks.shape[1] + 1), np.int32)
    rows[:, 1:] = np.cumsum(blocks.sum(-1), -1)
    cols = np.zeros((blocks.shape[0], int(rows[:, -1].max())), np.int32)
    for layout, kept in enumerate(blocks):
        listed = np.nonzero(kept)[1]
        cols[layout, : listed.size] = listed
    return rows, cols


def _shared_buffers(model: ir.Model, sparse: ir.Node, node_name: str, call: AttentionCall) -> list[ir.Value]:
    """Graph inputs past_key, past_value; names the node's present outputs and makes them graph outputs."""
    shape = ir.Shape([call.batch, call.kv_heads, call.seq, call.head_dim])
    pairs = json.loads(model.metadata_props.get(SHARED_BUFFERS, "[]"))
    past = []
    for slot, kind in ((1, "key"), (2, "value")):
        value = ir.Value(name=f"{node_name}.past_{kind}", shape=shape, type=ir.TensorType(ir.DataType(call.dtype)))
        model.graph.inputs.append(value)
        present = sparse.outputs[slot]
        present.name, present.shape, present.dtype = f"{node_name}.present_{kind}", shape, ir.DataType(call.dtype)
        model.graph.outputs.append(present)
        pairs.append([value.name, present.name])
        past.append(value)
    model.metadata_props[SHARED_BUFFERS] = json.dumps(pairs)
    return past


def _per_batch_row(graph: ir.Graph, before: ir.Node, packed: ir.Value, value: np.generic,
                   batch: int | str) -> ir.Value:
    """[B] filled with `value`: a constant for a static batch, else expanded to dim 0 of `packed`."""
    if isinstance(batch, int):
        return _const(graph, before, np.full(batch, value))
    rows = ir.node("Shape", [packed], {"start": 0, "end": 1})
    filled = ir.node("Expand", [_const(graph, before, np.asarray(value)), rows.outputs[0]])
    graph.insert_before(before, [rows, filled])
    return filled.outputs[0]


def rewrite_attention(model: ir.Model, node: ir.Node, fit: AttentionFit, call: AttentionCall) -> None:
    """Replace `node` by the contrib op `fit` names (q, k, v packed to [B, S, H * D] and back)."""
    graph, name = model.graph, node.name or "block_attention"
    q, k, v = (_pack(graph, node, x, call, h) for x, h in zip(node.inputs[:3], (call.q_heads, *[call.kv_heads] * 2)))
    attrs = {"num_heads": call.q_heads, "kv_num_heads": call.kv_heads, "scale": call.scale}
    if fit.op == "GroupQueryAttention":
        seqlens_k = _per_batch_row(graph, node, q, np.int32(call.seq - 1), call.batch)
        inputs = [q, k, v, None, None, seqlens_k, _const(graph, node, np.array(call.seq, np.int32))]
        if call.sinks:  # head_sink [Hq] in q's dtype: the extra logit in each row's softmax denominator
            cast = ir.node("Cast", [node.inputs[8]], {"to": ir.DataType(call.dtype)})
            graph.insert_before(node, cast)
            inputs += [None] * 4 + [cast.outputs[0]]
        if call.softcap > 0:
            attrs["softcap"] = call.softcap
        contrib = ir.node(fit.op, inputs, {**attrs, "local_window_size": fit.window}, domain=CONTRIB, num_outputs=1)
        graph.insert_before(node, contrib)
    else:
        rows, cols = _csr(fit.blocks)
        total, key_lengths = np.array(call.seq, np.int32), np.full(call.batch, call.seq, np.int32)
        tables = [_const(graph, node, x) for x in (rows, cols, total, key_lengths)]
        contrib = ir.node(fit.op, [q, k, v, None, None, *tables], {**attrs, "sparse_block_size": call.block},
                          domain=CONTRIB, num_outputs=3)
        graph.insert_before(node, contrib)
        past_key, past_value = _shared_buffers(model, contrib, name, call)
        contrib.replace_input_with(3, past_key)
        contrib.replace_input_with(4, past_value)
    contrib.outputs[0].dtype = ir.DataType(call.dtype)
    contrib.outputs[0].shape = ir.Shape([call.batch, call.seq, call.q_heads * call.head_dim])
    _unpack(graph, node, contrib.outputs[0], call)


def drop_unused(graph: ir.Graph, node: ir.Node) -> None:
    """Remove `node` when no output is used, then its producers and initializers left unused."""
    if node.graph is None or any(v.uses() or v.is_graph_output() for v in node.outputs):
        return
    inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    drop_unused_values(graph, inputs)


def drop_unused_values(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the initializers and producers of `values` that nothing reads any more."""
    for value in values:
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer() and value.name in graph.initializers:
            del graph.initializers[value.name]
        elif value.producer() is not None:
            drop_unused(graph, value.producer())


def map_attention(model: ir.Model, opset: int) -> tuple[list[tuple[str | None, str]], dict[str, str]]:
    """Map every block_attention node that fits a contrib op, removing layouts no longer read.

    Returns (contrib op, log line) per mapped block_attention (op None for the
    block_layout it absorbed), and by node name the log line of every attention
    node (block_attention or block_layout) that keeps its function form.
    """
    mapped, kept, cache = [], {}, {}
    for node in [n for n in model.graph if n.domain == DOMAIN and n.op_type == "block_attention"]:
        fit, layout = fit_attention(node, model.opset_imports.get("", opset), cache)
        if isinstance(fit, str):
            kept[node.name] = misfit_line(node, fit)
            if layout is not None:
                kept.setdefault(layout.name, f"{layout.op_type} '{layout.name}': feeds block_attention "
                                             f"'{node.name}', which keeps its function form; function form")
            continue
        call, inputs = attention_call(node), [v for v in node.inputs if v is not None]
        rewrite_attention(model, node, fit, call)
        detail = (f"local_window_size={fit.window}" if fit.op == "GroupQueryAttention" else
                  f"sparse_block_size={call.block}, {int(fit.blocks.sum())} of {fit.blocks[0].size} blocks "
                  f"in {fit.blocks.shape[0]} layout(s); past/present bound to one buffer by sparsecc.onnx.runner")
        mapped.append((f"com.microsoft.{fit.op}", f"block_attention '{node.name}': com.microsoft.{fit.op} ({detail})"))
        if layout is None:   # a constant layout: its initializers go with the node
            drop_unused_values(model.graph, inputs)
            continue
        drop_unused(model.graph, layout)
        if layout.graph is None:
            line = (f"{layout.op_type} '{layout.name}': evaluated at export time into com.microsoft.{fit.op} "
                    f"of block_attention '{node.name}'")
            mapped.append((None, line))
    return mapped, kept
