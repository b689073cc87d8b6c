"""The networkx view, module-path queries and DOT export."""
from __future__ import annotations

import networkx as nx
import torch

from sparsecc.passes.graph import (in_module, module_index, module_path, module_subgraph, nodes_in_module, to_dot,
                                   to_networkx)

from .helpers import TwoLayer, capture

X = torch.randn(2, 3, 8)


def test_networkx_nodes_edges_and_attributes():
    gm = capture(TwoLayer(), (X,))
    graph = to_networkx(gm)
    assert set(graph.nodes) == {n.name for n in gm.graph.nodes} and nx.is_directed_acyclic_graph(graph)
    assert graph.has_edge("x", "linear") and graph.has_edge("layers_0_fc1_weight", "linear")
    assert graph.nodes["linear"] == {"op": "call_function", "target": "aten.linear", "shape": "f32[2,3,8]",
                                     "module": "layers.0.fc1"}
    assert graph.nodes["layers_0_fc1_weight"]["target"] == "layers.0.fc1.weight"


def test_nodes_in_module_follow_the_module_stack():
    gm = capture(TwoLayer(), (X,))
    names = lambda prefix: [n.name for n in nodes_in_module(gm, prefix)]  # noqa: E731
    assert names("layers.0.fc1") == ["linear"]
    assert names("layers.0") == ["linear", "relu", "relu_1", "linear_1", "add"]
    assert "linear" not in names("layers.1") and "add" in names("layers.0") and "add" not in names("layers.0.fc2")
    assert len(names("")) == len([n for n in gm.graph.nodes if n.op == "call_function"])
    linear = nodes_in_module(gm, "layers.0.fc1")[0]
    assert module_path(linear) == "layers.0.fc1" and not in_module(linear, "layers.0.fc")


def test_module_index_holds_nodes_in_module_for_every_path():
    gm = capture(TwoLayer(), (X,))
    index = module_index(gm)
    assert {"", "layers", "layers.0", "layers.0.fc1", "layers.1"} <= set(index)
    for path, nodes in index.items():
        assert nodes == nodes_in_module(gm, path)


def test_module_subgraph_is_a_connected_region():
    region = module_subgraph(capture(TwoLayer(), (X,)), "layers.1")
    assert set(region.nodes) == {"linear_2", "relu_2", "relu_3", "linear_3", "add_1"} and nx.is_weakly_connected(region)


def test_dot_text():
    dot = to_dot(capture(TwoLayer(), (X,)))
    assert dot.startswith('digraph "forward" {') and dot.endswith("}\n")
    assert 'label="layers.0.fc1";' in dot and '"x" -> "linear";' in dot
    assert '"linear" [label="linear\\naten.linear\\nf32[2,3,8]", fillcolor="white"];' in dot
