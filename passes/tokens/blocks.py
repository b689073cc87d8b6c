"""Find the residual blocks token routing can skip: `out = h + f(h)` in a captured graph.

`where="mlp"`: every `aten.add.Tensor(h, y)` whose `y` depends on `h` through a
body that (1) does its matmuls inside child modules of the module that makes
the add (`model.layers.3` adds `model.layers.3.mlp(...)`), (2) mixes no
tokens (no attention, no matmul of two activations; a matmul with expert rows
indexed out of a stacked weight is a weight matmul), (3) reads nothing but
`h` and constants, and (4) keeps its intermediates to itself. The body is the
set of nodes on a path from `h` to the add; the region driver's numerical
confirmation then checks it acts token by token (`check`).

The router's features are the block's normalised input: the latest node that
every path from `h` to the first matmul passes through and that still has
h's shape (RMSNorm/LayerNorm output); `h` itself when the block has no norm.
Parallel-residual blocks (`h + attn(h) + mlp(h)`) are found in `parallel`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from ..graph import VALUE_PRESERVING, module_path, module_paths
from ..region import ASSERTS, NotARegion, ancestors

aten = torch.ops.aten
MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
           aten.convolution.default, aten.baddbmm.default}
ATTENTION = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default}
# Ops between a stacked weight and its matmul that keep it a weight: expert rows picked by index, views.
_WEIGHT_VIEWS = VALUE_PRESERVING + (aten.index.Tensor, aten.index_select.default, aten.select.int, aten.slice.Tensor,
                                    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                    aten.transpose.int, aten.permute.default, aten.t.default, aten.numpy_T.default,
                                    aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim)


class NotRoutable(NotARegion):
    """The candidate is not a routable residual block; the message says why."""


class NoUpdate(NotRoutable):
    """Neither operand of the add is computed from the other: not `h + f(h)` (perhaps part of a larger sum)."""


class MixesTokens(NotRoutable):
    """The candidate's update mixes tokens (attention): not an MLP block, perhaps a parallel-residual one."""


@dataclass
class ResidualBlock:
    path: str                      # the module the routed computation lives in (`model.layers.3.mlp`)
    where: str                     # mlp | layer
    residual: Node                 # h, the residual stream entering the block
    output: Node                   # h + f(h), what routing replaces
    body: list[Node]               # nodes from h to output (output included, h excluded), graph order
    source: Node                   # router features: the block's normalised input ([B, S, H])
    extra_inputs: list[Node] = field(default_factory=list)   # non-constant inputs besides h (layer)
    extra_kinds: list[str] = field(default_factory=list)     # per extra input: rows | mask (body_copy)
    bypass: list[Node] = field(default_factory=list)         # terms unrouted tokens add to h (parallel attention)

    @property
    def shape(self) -> list[int]:
        return list(self.residual.meta["val"].shape)

    @property
    def layer(self) -> str:
        return self.path

    @property
    def nodes(self) -> list[Node]:
        return self.body


def routed_body(block: ResidualBlock) -> tuple[list[Node], list[Node]]:
    """(nodes to run on the kept tokens, the node inputs they read besides constants and extras).

    The norm in front of the router features already ran on every token for the
    scores, so the copy starts from the gathered features `n` and the gathered
    residual; when something after `n` also reads the norm's intermediates, the
    whole body is copied from the residual."""
    if block.source is block.residual:
        return block.body, [block.residual]
    inside, keep, stack = set(block.body), set(), [block.output]
    while stack:
        node = stack.pop()
        if node in keep or node not in inside or node is block.source:
            continue
        keep.add(node)
        stack.extend(node.all_input_nodes)
    reads = {i for n in keep for i in n.all_input_nodes if i in inside and i not in keep}
    if reads - {block.source}:
        return block.body, [block.residual]
    return [n for n in block.body if n in keep], [block.residual, block.source]


def is_sparse_op(node: Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "sparsecc"


def library_op(node: Node) -> bool:
    """An op of another library (`transformers::grouped_mm_fallback`, the expert GEMMs): part of where the
    block's work happens, so the block's path covers it."""
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "sparsecc")


def is_matmul(node: Node) -> bool:
    return node.op == "call_function" and (node.target in MATMULS or node.target in ATTENTION
                                            or (is_sparse_op(node) and node.target._opname != "route"))


def _constant(node: Node) -> bool:
    return node.op == "get_attr"


def describe(node: Node) -> str:
    """How a skip reason names a node: its op and module path (or the model input), never its FX name."""
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "output":
        return "the model's output"
    return f"{str(node.target).removesuffix('.default')} in {module_path(node) or '<root>'}"


def weight_derived(node: Node) -> bool:
    """Whether `node` is a constant, or expert rows of one picked by index / viewed (batched_mm experts)."""
    while isinstance(node, Node) and node.target in _WEIGHT_VIEWS:
        node = node.args[0]
    return isinstance(node, Node) and _constant(node)


def mixes_tokens(node: Node) -> bool:
    """Attention, or a matmul of two activations (q @ k^T): what an MLP never does."""
    if node.target in ATTENTION or (is_sparse_op(node) and "attention" in node.target._opname):
        return True
    if node.target in (aten.bmm.default, aten.matmul.default, aten.mm.default):
        return not any(weight_derived(a) for a in node.args[:2] if isinstance(a, Node))
    return False


def _from_constants(node: Node) -> bool:
    """A value computed from constants alone (a router weight cast to float32): no model input upstream."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return False
        for inp in current.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return True


def with_constant_inputs(body: list[Node]) -> list[Node]:
    """`body` plus the values computed from constants alone that only it reads, so a copy recomputes them,
    and the outputs of its multi-output ops nothing reads (a router topk's values), so it is erased whole."""
    members = set(body)
    graph = body[0].graph if body else None
    while True:
        pulled = {i for n in members for i in n.all_input_nodes if i not in members and i.op == "call_function"
                  and all(u in members or u.target in ASSERTS for u in i.users) and _from_constants(i)}
        pulled |= {u for n in members for u in n.users if u.target is operator.getitem and not u.users}
        if not pulled - members:
            break
        members |= pulled
    return [n for n in graph.nodes if n in members] if graph is not None else body


def body_between(start: Node, end: Node) -> list[Node]:
    """Nodes on a path start -> end (end included, start excluded), in graph order."""
    upstream = ancestors([end])
    reach, stack = set(), [start]
    while stack:
        for user in stack.pop().users:
            if user in upstream and user not in reach:
                reach.add(user)
                stack.append(user)
    return [n for n in end.graph.nodes if n in reach]


def common_module(nodes: list[Node]) -> str:
    parts = [module_path(n).split(".") for n in nodes]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def check_closed(block_nodes: list[Node], output: Node) -> None:
    """The body's intermediates are read only inside it (shape asserts aside)."""
    inside = set(block_nodes)
    for node in block_nodes:
        if node is output:
            continue
        outside = [u for u in node.users if u not in inside and u.target not in ASSERTS]
        if outside:
            raise NotRoutable(f"an intermediate of the block ({describe(node)}) is also read outside it "
                              f"({describe(outside[0])})")


def outside_inputs(body: list[Node], residual: Node) -> list[Node]:
    inside, extra = set(body), []
    for node in body:
        for inp in node.all_input_nodes:
            if inp not in inside and inp is not residual and not _constant(inp) and inp not in extra:
                extra.append(inp)
    return extra


def router_source(body: list[Node], residual: Node) -> Node:
    """The latest dominator of the first matmul, before any matmul, with the residual's shape."""
    first = next((n for n in body if is_matmul(n)), None)
    if first is None:
        return residual
    graph = nx.DiGraph()
    graph.add_node(residual)
    inside = set(body) | {residual}
    graph.add_edges_from((i, n) for n in body for i in n.all_input_nodes if i in inside)
    idom = nx.immediate_dominators(graph, residual)
    want = residual.meta["val"].shape
    node = idom.get(first, residual)
    while node is not residual:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.shape == want and val.is_floating_point():
            return node
        node = idom[node]
    return residual


def mlp_block(add: Node) -> ResidualBlock:
    """The MLP residual block ending at `add`, or NotRoutable with the reason."""
    outer = module_path(add)
    for residual, update in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        if not (isinstance(residual, Node) and isinstance(update, Node)):
            continue
        body = with_constant_inputs(body_between(residual, add))
        matmuls = [n for n in body if is_matmul(n)]
        if update not in body or not matmuls:
            continue
        if any(mixes_tokens(n) for n in body):
            raise MixesTokens("the block mixes tokens (attention): not an MLP")
        prefix = outer + "." if outer else ""
        if not all(module_path(n).startswith(prefix) and module_path(n) != outer for n in matmuls):
            raise NotRoutable(f"its matmuls are not all inside child modules of '{outer or '<root>'}'")
        check_closed(body, add)
        extra = outside_inputs(body, residual)
        if extra:
            raise NotRoutable(f"the MLP reads {describe(extra[0])} besides the residual stream")
        path = common_module(matmuls + [n for n in body if library_op(n)])
        return ResidualBlock(path, "mlp", residual, add, body, router_source(body, residual))
    raise NoUpdate("no operand of the add is computed from the other through a matmul")


def residual_adds(gm: GraphModule) -> list[Node]:
    """Tensor + tensor adds of the residual's shape made by a module above the one that made an operand."""
    adds = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        val = node.meta.get("val")
        same_shape = isinstance(val, torch.Tensor) and val.dim() >= 3 and \
            a.meta["val"].shape == b.meta["val"].shape == val.shape
        if same_shape and any(_made_deeper(x, len(module_paths(node))) for x in (a, b)):
            adds.append(node)
    return adds


def _made_deeper(node: Node, depth: int, hops: int = 3) -> bool:
    """Whether `node`, or what it sums or carries through casts / eval dropout (Falcon's
    `dropout_add(mlp_output + attention_output, residual)` in the layer itself), was made below `depth`."""
    if len(module_paths(node)) > depth:
        return True
    passes_on = node.target in VALUE_PRESERVING or node.target in (aten.add.Tensor, aten.add_.Tensor)
    return hops > 0 and passes_on and any(_made_deeper(i, depth, hops - 1) for i in node.all_input_nodes)


__all__ = [
    "ATTENTION",
    "MATMULS",
    "MixesTokens",
    "NoUpdate",
    "NotRoutable",
    "ResidualBlock",
    "body_between",
    "with_constant_inputs",
    "check_closed",
    "common_module",
    "describe",
    "is_matmul",
    "library_op",
    "mixes_tokens",
    "mlp_block",
    "outside_inputs",
    "residual_adds",
    "routed_body",
    "router_source",
    "weight_derived",
]
