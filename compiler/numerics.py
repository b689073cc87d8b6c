"""Error of a compiled model's outputs against a reference, and where a non-finite output came from."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from sparsecc.passes import module_path
from sparsecc.passes.fake import resolve_attr
from sparsecc.passes.numerics import relative_error as tensor_relative_error
from sparsecc.passes.printer import op_name
from sparsecc.passes.state import state_targets


def relative_error(outputs: Any, reference: Any) -> float:
    """Largest relative L2 error ||y - y_ref|| / ||y_ref|| over the floating-point output tensors.

    nan when any compared output holds a NaN, else inf when one holds an inf: a non-finite
    output is never averaged or max()-ed away into a finite number.
    """
    errors = [_pair_error(got, want) for got, want in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(reference))
              if isinstance(want, torch.Tensor) and want.is_floating_point()]
    if any(math.isnan(e) for e in errors):
        return math.nan
    return max(errors, default=0.0)


def _pair_error(got: Any, want: torch.Tensor) -> float:
    if not isinstance(got, torch.Tensor):
        return math.nan                    # a float output the program did not produce as a tensor
    if _has_nan(got) or _has_nan(want):
        return math.nan
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return math.inf
    return tensor_relative_error(got, want)


def _has_nan(t: torch.Tensor) -> bool:
    return t.is_floating_point() and bool(torch.isnan(t).any())


def is_non_finite(value: Any) -> bool:
    """Whether any floating-point tensor in the pytree `value` holds a NaN or an inf."""
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in pytree.tree_leaves(value))


@dataclass(frozen=True)
class NonFiniteSite:
    """The first op whose output became non-finite while its activation inputs were finite."""
    graph: str       # "rewritten" or "dense": the graph that was run
    layer: str       # module path from nn_module_stack ("" at the top level)
    op: str          # sparsecc.nm_linear, aten.add.Tensor, ...
    node: str        # the FX node's name

    def describe(self) -> str:
        return f"{self.layer or '<top level>'} ({self.op}, node %{self.node}) in the {self.graph} graph"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class _NonFiniteTracer(torch.fx.Interpreter):
    """Runs a graph node by node and remembers the first call whose output turned non-finite.

    Constants (get_attr) do not count as inputs: a layer whose weight holds an inf is the
    layer to name, so only placeholders and call results are checked upstream.
    """

    def __init__(self, gm: torch.fx.GraphModule, graph: str):
        super().__init__(gm)
        self.graph_name, self.site = graph, None   # `graph` is the Interpreter's own attribute
        self.non_finite: set[torch.fx.Node] = set()

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if node.op in ("placeholder", "call_function", "call_method", "call_module") and is_non_finite(result):
            self.non_finite.add(node)
            inputs_finite = not any(arg in self.non_finite for arg in node.all_input_nodes)
            if self.site is None and node.op == "call_function" and inputs_finite:
                self.site = NonFiniteSite(self.graph_name, module_path(node), op_name(node.target), node.name)
        return result


def first_non_finite(gm: torch.fx.GraphModule, flat_inputs: tuple, graph: str) -> Optional[NonFiniteSite]:
    """Run `gm` on its placeholders' values; None when no call output is non-finite from finite inputs.
    The program state `gm` writes is put back afterwards: a diagnosis is not a call."""
    state = {name: resolve_attr(gm, name).detach().clone() for name in state_targets(gm)}
    tracer = _NonFiniteTracer(gm, graph)
    with torch.no_grad():
        try:
            tracer.run(*flat_inputs, enable_io_processing=False)   # placeholders take the flat leaves
        finally:
            for name, value in state.items():
                resolve_attr(gm, name).copy_(value)
    return tracer.site


def locate_non_finite(outputs: Any, dense_outputs: Any, rewritten: torch.fx.GraphModule,
                      dense: torch.fx.GraphModule, flat_inputs: tuple) -> Optional[NonFiniteSite]:
    """Where the non-finite values started: in the rewritten graph when its outputs are non-finite,
    else in the dense graph (the reference itself overflowed); run only when an error is non-finite."""
    if is_non_finite(outputs):
        return first_non_finite(rewritten, flat_inputs, "rewritten")
    if is_non_finite(dense_outputs):
        return first_non_finite(dense, flat_inputs, "dense")
    return None
