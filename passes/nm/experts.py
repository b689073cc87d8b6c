"""The prune-nm rule for the stacked expert weights of `sparsecc.moe`.

    sparsecc.moe(hidden [T, H], router_logits [T, E], w_gate_up [E, 2I, H] or [E, I, H], w_down [E, H, I],
                 shared..., top_k, normalize, scoring, activation, gated, capacity_factor, **options)

Any call matches, whatever routing and expert options it sets (correction bias, group limit, scaling,
expert biases, interleaved or clamped SwiGLU, sparsemixer); the rewrite keeps every argument but the
two stacked weights. Each expert's matrices are pruned N:M along their reduction dims (H for gate/up,
I for down) and kept compressed at rest; `sparsecc.nm_decompress` expands them for each call (the
grouped GEMMs read dense weights).

Wanda and SparseGPT see, for expert e, only what reaches e's matmuls on the
calibration batches, computed by the runtime's own routing and expert form
(`moe_routing.route_within_capacity`, `ExpertForm`) with all of the call's
options: gate/up reads the hidden rows of the tokens routed to e, down reads
form(rows @ gate_up[e].T + b_gate_up[e]) of those rows, computed with e's
gate/up already pruned. An expert no calibration token reached has no
statistics; it is pruned by magnitude and the record says so
(`routed_rows`, `magnitude_experts`).

The record carries moe-dispatch's provenance of each pruned weight (`sources`), from which
compiler/reference.py rebuilds the model's own parameters, pruned, for `error_vs_reference`.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from sparsecc.runtime.kernels.cpu.moe import ExpertForm
from sparsecc.runtime.kernels.moe_contract import MOE_ARGUMENTS, MoECall
from sparsecc.runtime.moe_routing import route_within_capacity

from ..match import AnyArg, Const, Match, Op, Var
from ..rewrite import CheckResult, fail, ok
from ..rewriter import Rewriter
from .compressed import layer_path
from .layerwise import LayerTarget
from .records import example_rows, nm_record
from .rule import NMRule

# hidden, router_logits and the two stacked weights by name; every other argument, options included, as given
MOE_PATTERN = Op(torch.ops.sparsecc.moe.default, Var("h"), Var("logits"), Const("w"), Const("w2"),
                 *(AnyArg() for _ in MOE_ARGUMENTS[4:]))


def bound_call(node: Node, values: dict[Node, Any]) -> MoECall:
    """The arguments of the moe call `node`, each argument node replaced by its value in `values`."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    return MoECall(*args, **kwargs)


def routed_rows(node: Node, values: dict, expert: int) -> Tensor:
    """The hidden rows of the tokens the moe call `node` sends to `expert`, in token order."""
    call = bound_call(node, values)
    _, experts, _ = route_within_capacity(call.router_logits, call.top_k, call.normalize, call.scoring,
                                          call.capacity_factor, **call.selection())
    tokens = (experts == expert).nonzero()[:, 0]
    return call.hidden[tokens]


def expert_hidden(node: Node, values: dict, expert: int) -> Tensor:
    """What the down projection of `expert` reads: the call's expert form of its routed rows' gate/up
    projection (bias included)."""
    call = bound_call(node, values)
    bias = None if call.b_gate_up is None else call.b_gate_up[expert]
    projected = F.linear(routed_rows(node, values, expert), call.w_gate_up[expert], bias)
    return ExpertForm.of(call).apply(projected)


def shared_rows(node: Node, values: dict, index: int) -> Tensor:
    """What the shared expert's gate/up reads: every hidden row."""
    return bound_call(node, values).hidden


def shared_hidden(node: Node, values: dict, index: int) -> Tensor:
    """What the shared expert's down projection reads: the call's expert form of every row's gate/up."""
    call = bound_call(node, values)
    return ExpertForm.of(call).apply(F.linear(call.hidden, call.shared_gate_up))


class ExpertRule(NMRule):
    """Check, replace and calibration targets of the stacked experts."""
    rule_name, pattern = "nm-moe-experts", MOE_PATTERN

    def layer(self, m: Match) -> str:
        return layer_path(m["w"]) + ".experts"

    def weight_problem(self, m: Match) -> CheckResult:
        for node in (m["w"], m["w2"]):
            k = self.weights.stored(node).shape[-1]
            if k % self.weights.options.m:
                return fail(f"expert reduction dim {k} is not divisible by M={self.weights.options.m}")
        return ok()

    def shared_layer(self, m: Match) -> str:
        """The shared expert's module ('...mlp.shared_experts'), from the parameter its down projection came from."""
        source = self._built_sources().get(MoECall(*m.node.args, **m.node.kwargs).shared_down.target)
        if isinstance(source, str):   # 'model.layers.0.mlp.shared_experts.down_proj.weight'
            return source.rpartition(".")[0].rpartition(".")[0]
        return layer_path(m["w"]) + ".shared_expert"

    def shared(self, m: Match) -> list[Node]:
        """The shared expert's (gate_up, down) constants when it has one prune-nm can prune (selected, K % M == 0);
        what stays dense is named with its reason by dense_weights.py."""
        call = MoECall(*m.node.args, **m.node.kwargs)
        nodes = [call.shared_gate_up, call.shared_down]
        if not all(isinstance(n, Node) and n.op == "get_attr" for n in nodes):
            return []
        divisible = all(self.weights.stored(n).shape[-1] % self.weights.options.m == 0 for n in nodes)
        return nodes if divisible and self.weights.options.selects(self.shared_layer(m)) else []

    def targets(self, m: Match) -> list[LayerTarget]:
        """gate/up first: the down projection's inputs are computed with the pruned gate/up."""
        same = lambda w: w  # noqa: E731  (stored [E, out, K] / [out, K] is already the matrix layout)
        shared = self.shared(m)
        reads = [(m["w"], routed_rows, self.layer(m)), (m["w2"], expert_hidden, self.layer(m))]
        reads += [(node, columns, self.shared_layer(m)) for node, columns in zip(shared, (shared_rows, shared_hidden))]
        return [LayerTarget(node=m.node, weight=node, layer=layer, columns=partial(columns, m.node),
                            to_matrix=same, from_matrix=same) for node, columns, layer in reads]

    def replace(self, m: Match, rw: Rewriter) -> Node:
        n, mm = self.weights.options.n, self.weights.options.m
        experts, shared = (m["w"], m["w2"]), self.shared(m)
        compressed = {node: self.weights.compress(node.target, self.weights.stored(node), rw)
                      for node in (*experts, *shared)}
        dense = {node: rw.call(torch.ops.sparsecc.nm_decompress.default, v, i, n, mm,
                               self.weights.stored(node).shape[-1]) for node, (v, i) in compressed.items()}
        args, kwargs = torch.fx.node.map_arg((m.node.args, m.node.kwargs), lambda a: dense.get(a, a))
        top_k = MoECall(*m.node.args, **m.node.kwargs).top_k
        self.weights.ctx.records.append(self._record(m, {w: compressed[w] for w in experts}, self.layer(m), top_k))
        if shared:   # every token runs the shared expert: top_k 1 over all rows
            self.weights.ctx.records.append(self._record(m, {w: compressed[w] for w in shared},
                                                         self.shared_layer(m), 1))
        return rw.call(torch.ops.sparsecc.moe.default, *args, **kwargs)

    def _record(self, m: Match, compressed: dict[Node, tuple[Node, Node]], layer: str, rows_per_token: int):
        weights = [self.weights.stored(node) for node in compressed]
        matrices = [w[0] if w.dim() == 3 else w for w in weights]
        flops = 2 * example_rows(m["h"].meta["val"], matrices[0].shape[-1]) * rows_per_token * sum(
            w.numel() for w in matrices)
        routing = self._routing_details(m) if weights[0].dim() == 3 else {}
        details = {**self._provenance(compressed), **self.weights.method_details(), **routing,
                   "compressed": {node.target: [v.target, i.target] for node, (v, i) in compressed.items()}}
        return nm_record(self.weights.gm, layer=layer, op="sparsecc.moe+nm_decompress",
                         source_op="sparsecc.moe", n=self.weights.options.n, m=self.weights.options.m,
                         shape=list(weights[0].shape), dense=weights, compressed=list(compressed.values()),
                         flops=flops, details=details)

    def _provenance(self, compressed: dict[Node, tuple[Node, Node]]) -> dict:
        """How moe-dispatch built each pruned weight from the model's parameters (its record's `sources`), so
        compiler/reference.py can put the pruned values back under the model's names; else why it cannot."""
        built = self._built_sources()
        unknown = [node.target for node in compressed if node.target not in built]
        if unknown:
            return {"reference": "unavailable",
                    "reference_unavailable": f"stacked expert weights {unknown} were not built by moe-dispatch from "
                                             "the model's parameters: their source is unknown"}
        return {"sources": {node.target: built[node.target] for node in compressed}}

    def _built_sources(self) -> dict[str, object]:
        """Constant name -> how moe-dispatch built it from the model's parameters (its records' `sources`)."""
        return {name: source for record in self.weights.ctx.records
                for name, source in record.details.get("sources", {}).items()}

    def _routing_details(self, m: Match) -> dict:
        """Calibration rows each expert saw, and the experts that saw none (pruned by magnitude)."""
        rows = self.weights.tokens.get(m["w"].target)
        if rows is None:
            return {}
        unseen = [e for e, count in enumerate(rows) if count == 0]
        return {"routed_rows": rows, **({"magnitude_experts": unseen} if unseen else {})}
