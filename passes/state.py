"""Program state: the constants (`get_attr` tensors) a graph writes in place.

A forward that updates a buffer (`self.calls += 1`, a KV cache's `index_copy_`)
captures as in-place ATen ops whose written argument is a `get_attr` node, or a
view of one (`to`, `select`, `transpose` ... return an alias of their input).
Those constants are the program's state: capture gives them private storage,
cleanup never merges them, the lowering lists them in `Program.state_names`.
Aliasing follows the schema (`Tensor(a)`), so an op that only *may* alias (`to`)
counts: a constant wrongly taken for state costs one private copy, nothing more.
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch.fx import GraphModule, Node


def _aliased_input(node: Node) -> Optional[Node]:
    """The input `node`'s result may alias (views, `to`, in-place ops returning self), else None."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or len(schema.returns) != 1:
        return None
    returned = schema.returns[0].alias_info
    if returned is None:
        return None
    for argument, value in zip(schema.arguments, node.args):
        info = argument.alias_info
        if info is not None and info.before_set & returned.before_set and isinstance(value, Node):
            return value
    return None


def alias_root(node: Node) -> Node:
    """The node whose storage `node` views: follows aliasing ops back to their source."""
    while (source := _aliased_input(node)) is not None:
        node = source
    return node


def written_nodes(node: Node) -> Iterator[Node]:
    """The arguments `node` writes in place, from its op schema (`Tensor(a!)`)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return
    for index, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, Node):
            yield value


def state_targets(gm: GraphModule) -> list[str]:
    """The `get_attr` targets the graph writes in place, in graph order, each once."""
    return list(dict.fromkeys(root.target for root in _written_roots(gm, "get_attr")))


def written_inputs(gm: GraphModule) -> list[str]:
    """The placeholders the graph writes in place (a forward that mutates its own inputs)."""
    return list(dict.fromkeys(root.name for root in _written_roots(gm, "placeholder")))


def _written_roots(gm: GraphModule, kind: str) -> list[Node]:
    """The `kind` nodes (get_attr, placeholder) that an in-place write reaches through views, each once."""
    roots: dict[Node, None] = {}
    for node in gm.graph.nodes:
        for target in written_nodes(node):
            root = alias_root(target)
            if root.op == kind:
                roots[root] = None
    return list(roots)
