"""A networkx view of the FX graph, module-path queries, and DOT export.

Node keys are FX node names; attributes are `op`, `target` (printed op
name), `shape` (printed type) and `module` (the innermost module path from
`nn_module_stack`, "" at the top level). Edges run producer -> consumer.
"""
from __future__ import annotations

import json
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .printer import format_type, op_name

aten = torch.ops.aten


def module_path(node: Node) -> str:
    """The innermost module that made `node` (`layers.0.fc1`), "" when unknown or top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def layer_name(node: Node) -> str:
    """How reports and skip reasons name the layer of `node`: its module path, else the node's name."""
    return module_path(node) or node.name


# Ops that leave a value's meaning unchanged (dtype casts, copies, eval-mode dropout): region
# matchers look through them to the value they carry.
VALUE_PRESERVING = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                    aten.alias.default, aten.contiguous.default, aten.dropout.default)


def through_casts(node: Any) -> Any:
    """The value `node` carries, past any chain of VALUE_PRESERVING ops."""
    while isinstance(node, Node) and node.target in VALUE_PRESERVING:
        node = node.args[0]
    return node


def module_paths(node: Node) -> list[str]:
    """Every module on `node`'s stack, outermost first."""
    return [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]


def in_module(node: Node, path_prefix: str) -> bool:
    """True when `node` was made inside module `path_prefix` (or a submodule of it)."""
    paths = module_paths(node)
    if path_prefix == "":
        return bool(paths)
    return any(p == path_prefix or p.startswith(path_prefix + ".") for p in paths)


def nodes_in_module(gm: GraphModule, path_prefix: str) -> list[Node]:
    """The call nodes made inside module `path_prefix`, in graph order."""
    return [n for n in gm.graph.nodes if in_module(n, path_prefix)]


def module_index(gm: GraphModule) -> dict[str, list[Node]]:
    """`nodes_in_module` for every module path at once, in one walk of the graph: a pass that looks up
    many modules (one per MoE block of a 61-layer model) would otherwise walk the graph once per lookup."""
    index: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        paths = module_paths(node)
        prefixes = {""} if paths else set()
        for path in paths:
            parts = path.split(".")
            prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for prefix in prefixes:
            index.setdefault(prefix, []).append(node)
    return index


def _target_text(node: Node) -> str:
    if node.op in ("call_function", "call_method"):
        return op_name(node.target)
    return str(node.target)


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The data-dependence graph of `gm`."""
    graph = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op, target=_target_text(node),
                       shape=format_type(node.meta.get("val")) if node.op != "output" else "",
                       module=module_path(node))
        graph.add_edges_from((source.name, node.name) for source in node.all_input_nodes)
    return graph


def module_subgraph(gm: GraphModule, path_prefix: str) -> nx.DiGraph:
    """The induced subgraph of the nodes made inside module `path_prefix`."""
    names = {n.name for n in nodes_in_module(gm, path_prefix)}
    return to_networkx(gm).subgraph(names).copy()


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # DOT strings share JSON's escapes for these


_FILL = {"placeholder": "lightblue", "get_attr": "lightgrey", "output": "lightblue"}


def _dot_node(name: str, attrs: dict[str, Any]) -> str:
    label = "\n".join(x for x in (name, attrs["target"] if attrs["op"] != "placeholder" else "", attrs["shape"]) if x)
    fill = _FILL.get(attrs["op"], "lightyellow" if attrs["target"].startswith("sparsecc.") else "white")
    return f'{_quote(name)} [label={_quote(label)}, fillcolor="{fill}"];'


def to_dot(gm: GraphModule, name: str = "forward") -> str:
    """DOT text: one box per node, nodes grouped in a cluster per module path."""
    graph = to_networkx(gm)
    lines = [f"digraph {_quote(name)} {{", '  node [shape=box, style=filled, fontname="monospace"];']
    clusters: dict[str, list[str]] = {}
    for node_name, attrs in graph.nodes(data=True):
        clusters.setdefault(attrs["module"], []).append(_dot_node(node_name, attrs))
    for index, (path, entries) in enumerate(clusters.items()):
        if path:
            lines.append(f"  subgraph cluster_{index} {{ label={_quote(path)};")
            lines += [f"    {e}" for e in entries] + ["  }"]
        else:
            lines += [f"  {e}" for e in entries]
    lines += [f"  {_quote(a)} -> {_quote(b)};" for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


__all__ = ["in_module", "module_index", "module_path", "module_paths", "module_subgraph", "nodes_in_module",
           "to_dot", "to_networkx"]
