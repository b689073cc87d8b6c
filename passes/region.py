"""Values of chosen graph nodes on the example inputs: what rewrites confirm themselves against."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .manager import PassContext


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: Node):
        result = super().run_node(node)
        if node in self.wanted:
            self.values[node] = result
        return result


def record_values(gm: GraphModule, ctx: PassContext, wanted: list[Node]) -> dict[Node, torch.Tensor]:
    """The values of `wanted` nodes when the graph runs on the example inputs."""
    if not wanted:
        return {}
    recorder = _Recorder(gm, set(wanted))
    with torch.no_grad():
        recorder.run(*pytree.tree_leaves(ctx.example_inputs))
    return recorder.values
