"""Each checked attention site (`generator_sites`) with its cache write as com.microsoft.GroupQueryAttention.

    query, key, value      [B, S, H * D]   this step's q (after rotary), new keys and values, packed
    past_key, past_value   [B, Hkv, L, D]  the graph inputs past_key_values.{i}.key / .value
    seqlens_k              int32 [B]       cache_position[-1] (total length - 1; left padding keeps
                                           every row at the same positions)
    total_sequence_length  int32 []        cache_position[-1] + 1
    attention_bias         [B, 1, S, T]    0 where attention_mask[:, :T] is 1, the dtype's lowest value
                                           on left padding (T = total length)
 -> output [B, S, Hq * D], present_key, present_value [B, Hkv, L, D] (the graph outputs present.{i}.*)

GroupQueryAttention writes the S new keys at T - S .. T - 1 (= cache_position, as
the site check confirmed) and applies the causal band (`local_window_size`)
itself. Padding rows see only masked keys and average them, where the model's
graph may give other numbers; no real row reads those rows' keys. Rows of
present past T are not written (the next step overwrites or ignores them).
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

from .contrib import CONTRIB
from .contrib_attention import drop_unused_values
from .exporter import ExportResult, OnnxExportError
from .generator_graph import past_names, present_names
from .generator_sites import CacheSite, SiteReport

_LOWEST = {ir.DataType.FLOAT: np.finfo(np.float32).min, ir.DataType.FLOAT16: np.finfo(np.float16).min}


def map_cache_attention(model: ir.Model, report: SiteReport, result: ExportResult) -> None:
    """Replace each site of `report` (its 4 extra outputs, after the decoder's named ones) by one
    GroupQueryAttention; log a line per layer; drop the extra outputs and what only they read."""
    graph = model.graph
    named = 1 + 2 * _cache_layers(graph)
    extra = list(graph.outputs[named:])
    if len(extra) != 4 * len(report.sites):
        raise OnnxExportError(f"generator export: the exported graph has {len(extra)} attention site outputs "
                              f"for {len(report.sites)} sites")
    while len(graph.outputs) > named:   # first: onnx_ir replaces no uses of a graph output
        graph.outputs.pop()
    step_inputs: dict = {}   # dtype -> (seqlens_k, total_sequence_length, attention_bias), shared by layers
    for number, site in enumerate(report.sites):
        _map_site(graph, site, extra[4 * number: 4 * number + 4], step_inputs)
        result.log.append(f"attention layer {site.layer}: com.microsoft.GroupQueryAttention with its KV cache "
                          f"(local_window_size={site.window}, key padding as attention_bias)")
        result.contrib_nodes["com.microsoft.GroupQueryAttention"] = (
            result.contrib_nodes.get("com.microsoft.GroupQueryAttention", 0) + 1)
    for layer in sorted(report.reasons):
        result.log.append(f"attention layer {layer}: generic form (index_copy into the cache, attention as exported); "
                          f"GroupQueryAttention does not fit: {report.reasons[layer]}")
    drop_unused_values(graph, extra)   # the replaced attention and cache writes go with them


def _cache_layers(graph: ir.Graph) -> int:
    return sum(1 for v in graph.outputs if (v.name or "").startswith("present.")) // 2


def _map_site(graph: ir.Graph, site: CacheSite, values: list[ir.Value], step_inputs: dict) -> None:
    """One GroupQueryAttention for the site's (q, new k, new v, attention output) values."""
    q, k, v, attention = values
    seqlens, total, bias = _step_inputs(graph, q.dtype, step_inputs)
    past = [_input(graph, name) for name in past_names(site.layer + 1)[-2:]]
    nodes: list = []
    packed = [_op(nodes, "Reshape", _op(nodes, "Transpose", x, perm=[0, 2, 1, 3]), _ints(nodes, 0, 0, -1))
              for x in (q, k, v)]
    attrs = {"num_heads": site.q_heads, "kv_num_heads": site.kv_heads, "scale": site.scale,
             "local_window_size": site.window, **({"softcap": site.softcap} if site.softcap > 0 else {})}
    gqa = ir.node("GroupQueryAttention", [*packed, *past, seqlens, total, None, None, None, bias], attrs,
                  domain=CONTRIB, num_outputs=3)
    nodes.append(gqa)
    gqa.outputs[0].dtype = q.dtype
    heads = _op(nodes, "Reshape", gqa.outputs[0], _ints(nodes, 0, 0, site.q_heads, site.head_dim))
    unpacked = _op(nodes, "Transpose", heads, perm=[0, 2, 1, 3])
    graph.insert_after(attention.producer(), nodes)
    unpacked.shape, unpacked.dtype = attention.shape, attention.dtype
    ir.convenience.replace_all_uses_with(attention, unpacked)
    for slot, name in zip((1, 2), present_names(site.layer + 1)[-2:]):
        _replace_output(graph, name, gqa.outputs[slot])


def _replace_output(graph: ir.Graph, name: str, value: ir.Value) -> None:
    index = next(i for i, out in enumerate(graph.outputs) if out.name == name)
    old = graph.outputs[index]
    value.shape, value.dtype = old.shape, old.dtype
    graph.outputs[index] = value
    old.name = f"{name}.generic"
    value.name = name


def _input(graph: ir.Graph, name: str) -> ir.Value:
    return next(v for v in graph.inputs if v.name == name)


def _const(nodes: list, values: np.ndarray) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(values)})
    nodes.append(node)
    return node.outputs[0]


def _ints(nodes: list, *values: int) -> ir.Value:
    return _const(nodes, np.array(values, np.int64))


def _step_inputs(graph: ir.Graph, dtype: ir.DataType, made: dict) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(seqlens_k, total_sequence_length, attention_bias) from cache_position and attention_mask, built
    once per dtype at the top of the graph."""
    if dtype in made:
        return made[dtype]
    position, mask = _input(graph, "cache_position"), _input(graph, "attention_mask")
    nodes: list = []
    last = _op(nodes, "Slice", position, _ints(nodes, -1), _ints(nodes, np.iinfo(np.int64).max))
    total = _op(nodes, "Add", last, _ints(nodes, 1))
    total32 = _op(nodes, "Cast", _op(nodes, "Squeeze", total, _ints(nodes, 0)), to=ir.DataType.INT32)
    batch = mask.shape[0]
    seqlens = _op(nodes, "Cast", _op(nodes, "Expand", last, _ints(nodes, batch)), to=ir.DataType.INT32)
    keys = _op(nodes, "Slice", mask, _ints(nodes, 0), total, _ints(nodes, 1))
    padding = _op(nodes, "Equal", keys, _const(nodes, np.array(0, np.int64)))
    lowest, zero = (_const(nodes, np.array(x, dtype.numpy())) for x in (_LOWEST[dtype], 0))
    bias = _op(nodes, "Unsqueeze", _op(nodes, "Where", padding, lowest, zero), _ints(nodes, 1, 2))
    shape = _op(nodes, "Concat", _ints(nodes, batch, 1), _op(nodes, "Shape", position), total, axis=0)
    made[dtype] = (seqlens, total32, _op(nodes, "Expand", bias, shape))
    graph.insert_before(next(iter(graph)), nodes)
    return made[dtype]


def _op(nodes: list, op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
    node = ir.node(op_type, list(inputs), attrs)
    nodes.append(node)
    return node.outputs[0]
