"""Copy a residual block's body so it runs on the K kept tokens instead of all S.

The body's nodes are re-emitted with the gathered tokens in place of the
residual stream. Shapes written into the graph as literals (`view(x, [B*S, H])`,
`view(y, [B, S, H])` in GPT-2's Conv1D, a flattened MoE) are rescaled:
a leading `[B, S, ...]` becomes `[B, K, ...]` and a leading `[B*S, ...]`
becomes `[B*K, ...]`; `-1` entries stay. In general the one dim equal to S
becomes K (`[B, heads, S, d]` in attention). An `arange` over c*B*S
(token, expert) pairs (transformers' grouped_mm dispatch) runs over c*B*K. Anything else that pins the
sequence length makes the copy fail its fake run or its confirmation, and the
block is left dense with the reason.

Inputs the body reads besides the residual stream (`where="layer"`: rotary
cos/sin tables, the attention mask) are gathered for the kept tokens by
`gather_input`: per-token tables along their token axis, masks along both
the query and the key axis, so attention among the kept tokens stays causal
and uses their original positions.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

aten = torch.ops.aten
SHAPE_ARG_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                 aten.new_zeros.default, aten.new_empty.default}   # shape is args[1] in each

Emit = Callable[[Node, tuple, dict], Node]


def emitter(call: Callable[..., Node]) -> Emit:
    """An Emit that makes the copy of `node` with `call` and keeps its module stack and stack trace
    (the report and the IR name the copied ops after the block they came from)."""
    def emit(node: Node, args: tuple, kwargs: dict) -> Node:
        made = call(node.target, *args, **kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                made.meta[key] = node.meta[key]
        return made
    return emit


class AmbiguousShape(ValueError):
    """A shape literal in which the sequence length cannot be told apart from another dim."""


def rescale_shape(shape: Any, batch: int, seq: int, kept: int) -> Any:
    """The one dim equal to S becomes K; else a leading B*S (B > 1) becomes B*K; -1 stays.

    `[B, S, ...]` -> `[B, K, ...]`, `[B*S, H]` -> `[B*K, H]`, `[B, heads, S, d]` -> `[B, heads, K, d]`;
    `[-1, E]` stays even when E == S (the leading -1 takes up the token count).
    A literal where S (or B*S) appears twice, or both appear, raises AmbiguousShape."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(d, int) for d in shape):
        return shape
    dims = list(shape)
    activation = len(dims) >= 2 and dims[0] == batch and dims[1] == seq and batch != seq
    if dims[0] == -1 and not activation:
        return dims   # a leading -1 takes up the (flattened) tokens; an S-sized dim after it is another size
    hits = [i for i, d in enumerate(dims) if d == seq]
    flat = [0] if batch > 1 and dims[0] == batch * seq else []   # flattened tokens lead: [B*S, ...]
    if activation:
        hits, flat = [1], []   # a [B, S, ...] activation: the token axis is 1, whatever the other dims are
    if len(hits) + len(flat) > 1:
        raise AmbiguousShape(f"shape {dims}: the sequence length {seq} (or {batch}*{seq}) appears more than once")
    if hits:
        dims[hits[0]] = kept
    elif flat:
        dims[flat[0]] = batch * kept
    return dims


def rescale_count(count: int, batch: int, seq: int, kept: int) -> int:
    """A count of (token, slot) pairs, c*B*S (an MoE dispatch's `arange(B*S*top_k)`), becomes c*B*K."""
    tokens = batch * seq
    return count // tokens * batch * kept if count >= tokens and count % tokens == 0 else count


def copy_nodes(body: list[Node], env: dict[Node, Any], emit: Emit, reshape: Callable[[Any], Any],
               recount: Optional[Callable[[int], int]] = None) -> Node:
    """Re-emit `body` in order through `emit`, inputs looked up in `env`, shape literals through `reshape`
    (and static `arange` lengths through `recount`, when given); returns the last copy."""
    node = None
    for node in body:
        args = map_arg(node.args, lambda n: env.get(n, n))
        if node.target in SHAPE_ARG_OPS and len(args) > 1:
            args = (args[0], reshape(args[1]), *args[2:])
        elif recount is not None and node.target is aten.arange.default and isinstance(args[0], int):
            args = (recount(args[0]), *args[1:])
        env[node] = emit(node, args, dict(map_arg(node.kwargs, lambda n: env.get(n, n))))
    return env[node]


def copy_body(body: list[Node], env: dict[Node, Any], emit: Emit, batch: int, seq: int, kept: int) -> Node:
    """`body` copied for K kept tokens per sequence ([B, S, ...] literals become [B, K, ...])."""
    return copy_nodes(body, env, emit, lambda shape: rescale_shape(shape, batch, seq, kept),
                      lambda count: rescale_count(count, batch, seq, kept))


def standalone_graph(gm: GraphModule, body: list[Node], inputs: list[Node],
                     copy: Callable[[list[Node], dict[Node, Any], Emit], Node]) -> GraphModule:
    """A GraphModule computing `copy(body, env, emit)` from `inputs` (in order) and `gm`'s constants."""
    graph = Graph()
    env: dict[Node, Any] = {inp: graph.placeholder(f"in_{i}") for i, inp in enumerate(inputs)}
    for node in body:
        for inp in node.all_input_nodes:
            if inp.op == "get_attr" and inp not in env:
                env[inp] = graph.get_attr(inp.target)

    def emit(node: Node, args: tuple, kwargs: dict) -> Node:
        return graph.call_function(node.target, args, kwargs)

    graph.output(copy(body, env, emit))
    return GraphModule(gm, graph)


def standalone_body(gm: GraphModule, body: list[Node], inputs: list[Node], batch: int, seq: int,
                    kept: int) -> GraphModule:
    """A GraphModule computing the body from `inputs` (gathered values, in order) on K tokens."""
    return standalone_graph(gm, body, inputs, lambda nodes, env, emit: copy_body(nodes, env, emit, batch, seq, kept))


def input_kind(node: Node, batch: int, seq: int) -> str:
    """How an extra input follows the tokens: `rows` ([B|1, S, ...]) or `mask` ([B|1, H|1, S, S])."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or int(val.shape[0]) not in (1, batch):
        return ""
    dims = [int(d) for d in val.shape]
    if val.dim() == 4 and dims[2] == dims[3] == seq and dims[1] != seq:
        return "mask"
    if dims[1] == seq:   # [B|1, S, ...]: the token axis of a per-position table is 1
        return "rows"
    return ""


def gather_input(call: Callable, kind: str, value: Any, indices: Any, shape: list[int], batch: int,
                 kept: int) -> Any:
    """`value` restricted to the kept tokens; `call(target, *args)` runs an op (eagerly or as a node)."""
    if kind == "rows":
        return call(torch.ops.sparsecc.route_gather.default, value, indices)
    heads, seq = shape[1], shape[2]
    full = call(aten.expand.default, value, [batch, heads, seq, seq])
    rows = call(aten.expand.default, call(aten.view.default, indices, [batch, 1, kept, 1]), [batch, heads, kept, seq])
    picked = call(aten.gather.default, full, 2, rows)
    cols = call(aten.expand.default, call(aten.view.default, indices, [batch, 1, 1, kept]), [batch, heads, kept, kept])
    return call(aten.gather.default, picked, 3, cols)


__all__ = [
    "SHAPE_ARG_OPS",
    "AmbiguousShape",
    "copy_body",
    "gather_input",
    "input_kind",
    "rescale_count",
    "rescale_shape",
    "standalone_body",
]
