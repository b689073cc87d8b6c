"""The prune-nm rule for the stacked expert weights of `sparsecc.moe`.

    sparsecc.moe(hidden [T, H], router_logits [T, E], w_gate_up [E, 2I, H] or [E, I, H], w_down [E, H, I],
                 shared..., top_k, normalize, scoring, activation, gated, capacity_factor)

Each expert's matrices are pruned N:M along their reduction dims (H for
gate/up, I for down) and kept compressed at rest; `sparsecc.nm_decompress`
expands them for each call (the grouped GEMMs read dense weights).

Wanda and SparseGPT see, for expert e, only what reaches e's matmuls on the
calibration batches: gate/up reads the hidden rows of the tokens routed to e
(top_k and capacity as the op dispatches them), down reads
act(gate) * up of those rows, computed with e's gate/up already pruned. An
expert no calibration token reached has no statistics; it is pruned by
magnitude and the record says so (`routed_rows`, `magnitude_experts`).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from sparsecc.runtime.kernels.cpu.moe import ACTIVATIONS
from sparsecc.runtime.moe_routing import route_within_capacity

from ..match import AnyArg, Const, Match, Op, Var
from ..rewrite import CheckResult, fail, ok
from ..rewriter import Rewriter
from .compressed import layer_path
from .layerwise import LayerTarget
from .records import example_rows, nm_record
from .rule import NMRule

MOE_PATTERN = Op(torch.ops.sparsecc.moe.default, Var("h"), Var("logits"), Const("w"), Const("w2"),
                 AnyArg(), AnyArg(), AnyArg(), Var("top_k"), Var("normalize"), Var("scoring"), Var("activation"),
                 Var("gated"), Var("capacity_factor", optional=True))


def routed_rows(m: Match, values: dict, expert: int) -> Tensor:
    """The hidden rows of the tokens `sparsecc.moe` (match `m`) sends to `expert`, in token order."""
    hidden, logits = values[m["h"]], values[m["logits"]]
    _, experts, _ = route_within_capacity(logits.reshape(-1, logits.shape[-1]), m["top_k"], m["normalize"],
                                          m["scoring"], m.get("capacity_factor") or 0.0)
    tokens = (experts == expert).nonzero()[:, 0]
    return hidden.reshape(-1, hidden.shape[-1])[tokens]


def expert_hidden(m: Match, values: dict, expert: int) -> Tensor:
    """What the down projection of `expert` reads: act(gate) * up (or act(gate_up)) of its routed rows."""
    projected = F.linear(routed_rows(m, values, expert), values[m["w"]][expert])
    act = ACTIVATIONS[m["activation"]]
    if m["gated"]:
        gate, up = projected.chunk(2, dim=-1)
        return act(gate) * up
    return act(projected)


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

    def targets(self, m: Match) -> list[LayerTarget]:
        """gate/up first: the down projection's inputs are computed with the pruned gate/up."""
        same = lambda w: w  # noqa: E731  (stored [E, out, K] is already the matrix layout)
        return [LayerTarget(node=m.node, weight=node, layer=self.layer(m), columns=partial(columns, m),
                            to_matrix=same, from_matrix=same)
                for node, columns in ((m["w"], routed_rows), (m["w2"], expert_hidden))]

    def replace(self, m: Match, rw: Rewriter) -> Node:
        n, mm = self.weights.options.n, self.weights.options.m
        compressed = {node: self.weights.compress(node.target, self.weights.stored(node), rw)
                      for node in (m["w"], m["w2"])}
        dense = {node: rw.call(torch.ops.sparsecc.nm_decompress.default, v, i, n, mm,
                               self.weights.stored(node).shape[-1]) for node, (v, i) in compressed.items()}
        args = [dense.get(a, a) if isinstance(a, Node) else a for a in m.node.args]
        self.weights.ctx.records.append(self._record(m, compressed))
        return rw.call(torch.ops.sparsecc.moe.default, *args, **m.node.kwargs)

    def _record(self, m: Match, compressed: dict[Node, tuple[Node, Node]]):
        weights = [self.weights.stored(node) for node in compressed]
        flops = 2 * example_rows(m["h"].meta["val"], weights[0].shape[-1]) * m["top_k"] * sum(
            w[0].numel() for w in weights)
        details = {"reference": "unavailable", **self.weights.method_details(), **self._routing_details(m),
                   "compressed": {node.target: [v.target, i.target] for node, (v, i) in compressed.items()}}
        return nm_record(self.weights.gm, layer=self.layer(m), op="sparsecc.moe+nm_decompress",
                         source_op="sparsecc.moe", n=self.weights.options.n, m=self.weights.options.m,
                         shape=list(weights[0].shape), dense=weights, compressed=list(compressed.values()),
                         flops=flops, details=details)

    def _routing_details(self, m: Match) -> dict:
        """Calibration rows each expert saw, and the experts that saw none (pruned by magnitude)."""
        rows = self.weights.tokens.get(m["w"].target)
        if rows is None:
            return {}
        unseen = [e for e, count in enumerate(rows) if count == 0]
        return {"routed_rows": rows, **({"magnitude_experts": unseen} if unseen else {})}
