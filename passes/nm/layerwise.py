"""Run the captured graph over calibration batches one layer at a time, pruning as it goes.

Every batch gets its own `torch.fx.Interpreter` environment; the batches
advance together node by node. When they reach a layer to prune, the layer's
inputs from all batches are observed (its statistics accumulated), the layer
is pruned, and its pruned weight replaces the dense one from then on: the
input of layer i+1 is computed with layers <= i already pruned, as SparseGPT
and Wanda do. A value is dropped as soon as its last reader has run, so peak
memory is the live activations at the frontier (about one layer's worth per
batch), not the whole model's. The graph itself is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from .fake import resolve_attr


@dataclass
class LayerTarget:
    """One layer to prune: its root node, input node, weight attribute and how to read its input."""
    node: Node
    x: Node
    weight: Node
    layer: str
    columns: Callable[[Tensor], Tensor]      # layer input -> [tokens, K] (im2col for convolutions)
    to_matrix: Callable[[Tensor], Tensor]    # stored weight -> [out, K]
    from_matrix: Callable[[Tensor], Tensor]  # [out, K] -> stored weight layout
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
    """weight attribute -> (pruned [out, K] weight, kept mask); `prune(target, weight, inputs)` chooses both.

    `inputs` yields the layer's input columns [tokens, K], one calibration batch at a time.
    A weight shared by several targets is pruned at its first use, from that use's inputs.
    """
    overrides: dict[str, Tensor] = {}
    pruned: dict[str, tuple[Tensor, Tensor]] = {}
    steppers = [_Stepper(gm, batch, overrides) for batch in batches]
    last_use = _last_uses(gm)
    at_node = {t.node: t for t in targets}
    bar = progress(total=len(targets)) if progress else None
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            target = at_node.get(node)
            if target is not None and target.weight.target not in pruned:
                pruned[target.weight.target] = _prune_one(gm, target, steppers, overrides, prune)
            if bar is not None and target is not None:
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
    stored = resolve_attr(gm, target.weight.target)
    inputs = (target.columns(s.env[target.x]) for s in steppers)
    weight, mask = prune(target, target.to_matrix(stored), inputs)
    overrides[target.weight.target] = target.from_matrix(weight)
    for stepper in steppers:  # values already computed from the dense weight are recomputed
        stepper.env[target.weight] = overrides[target.weight.target]
        for between in target.between:
            stepper.env[between] = stepper.run_node(between)
    return weight, mask
