"""Run the captured graph over calibration batches one layer at a time, pruning as it goes.

Every batch gets its own `torch.fx.Interpreter` environment; the batches
advance together node by node. When they reach a layer to prune, the layer's
inputs from all batches are observed (its statistics accumulated), the layer
is pruned, and its pruned weight replaces the dense one from then on: the
input of layer i+1 is computed with layers <= i already pruned, as SparseGPT
and Wanda do. A value is dropped as soon as its last reader has run, so peak
memory is the live activations at the frontier (about one layer's worth per
batch), not the whole model's. The graph itself is never modified.

A target's weight is one matrix [out, K] (a linear or conv layer) or a stack
of them [E, out, K] (the experts of a `sparsecc.moe`); each matrix is pruned
from its own inputs, which `columns(values, index)` reads from the batch's
node values (for expert e: only the tokens routed to e).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..fake import resolve_attr


@dataclass
class LayerTarget:
    """One weight to prune at root `node`: how to read it as matrices and the input columns each matrix sees."""
    node: Node
    weight: Node
    layer: str
    columns: Callable[[dict[Node, Any], int], Tensor]  # (node values, matrix index) -> [tokens, K] (im2col for conv)
    to_matrix: Callable[[Tensor], Tensor]    # stored weight -> [out, K], or [E, out, K] for stacked experts
    from_matrix: Callable[[Tensor], Tensor]  # that layout -> stored weight layout
    between: tuple[Node, ...] = ()           # nodes from the weight to the root (aten.t), re-run after pruning


class _Stepper(torch.fx.Interpreter):
    """An Interpreter driven one node at a time, with weights overridden once pruned."""

    def __init__(self, gm: GraphModule, inputs: tuple, overrides: dict[str, Tensor]):
        super().__init__(gm, garbage_collect_values=False)
        self.overrides = overrides
        self.args_iter = iter(inputs)
        self.env = {}

    def get_attr(self, target, args, kwargs):
        if target in self.overrides:
            return self.overrides[target]
        return super().get_attr(target, args, kwargs)

    def step(self, node: Node, last_use: dict[Node, list[Node]]) -> None:
        self.env[node] = self.run_node(node)
        for dead in last_use.get(node, ()):
            self.env.pop(dead, None)


def _last_uses(gm: GraphModule) -> dict[Node, list[Node]]:
    """node -> the values whose last reader it is."""
    last = {}
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            last[source] = node
    uses: dict[Node, list[Node]] = {}
    for source, reader in last.items():
        uses.setdefault(reader, []).append(source)
    return uses


PruneFn = Callable[[LayerTarget, Tensor, Iterable[Tensor]], tuple[Tensor, Tensor]]


def prune_layerwise(gm: GraphModule, batches: list[tuple], targets: list[LayerTarget], prune: PruneFn,
                    progress: Optional[Callable] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """weight attribute -> (pruned weight, kept mask) in `to_matrix`'s layout; `prune(target, matrix, inputs)`
    chooses both for each [out, K] matrix of the weight.

    `inputs` yields that matrix's input columns [tokens, K], one calibration batch at a time.
    A weight shared by several targets is pruned at its first use, from that use's inputs.
    """
    overrides: dict[str, Tensor] = {}
    pruned: dict[str, tuple[Tensor, Tensor]] = {}
    steppers = [_Stepper(gm, batch, overrides) for batch in batches]
    last_use = _last_uses(gm)
    at_node: dict[Node, list[LayerTarget]] = {}
    for t in targets:  # in order: an expert's down projection reads its pruned gate/up projection
        at_node.setdefault(t.node, []).append(t)
    bar = progress(total=len(targets)) if progress else None
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            for target in at_node.get(node, ()):
                if target.weight.target not in pruned:
                    pruned[target.weight.target] = _prune_one(gm, target, steppers, overrides, prune)
                if bar is not None:
                    bar.update(1)
            for index, stepper in enumerate(steppers):
                try:
                    stepper.step(node, last_use)
                except Exception as err:
                    err.add_note(f"while running calibration batch {index} through %{node.name} of the captured "
                                 "graph (each batch must fit the shapes the model was captured with)")
                    raise
    if bar is not None:
        bar.close()
    return pruned


def _prune_one(gm: GraphModule, target: LayerTarget, steppers: list[_Stepper], overrides: dict,
               prune: PruneFn) -> tuple[Tensor, Tensor]:
    matrix = target.to_matrix(resolve_attr(gm, target.weight.target))
    stack = matrix if matrix.dim() == 3 else matrix[None]
    parts = [prune(target, w, (target.columns(s.env, index) for s in steppers)) for index, w in enumerate(stack)]
    weight, mask = (torch.stack(p).reshape(matrix.shape) for p in zip(*parts))
    overrides[target.weight.target] = target.from_matrix(weight)
    for stepper in steppers:  # values already computed from the dense weight are recomputed
        stepper.env[target.weight] = overrides[target.weight.target]
        for between in target.between:
            stepper.env[between] = stepper.run_node(between)
    return weight, mask
