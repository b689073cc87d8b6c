"""The prune-nm rules for linear layers: one per way a linear reaches the graph.

`transposed` says whether the constant is stored `[in, out]` (GPT-2 Conv1D,
`x @ W`) rather than `[out, in]`:

    aten.linear(x, W, b?)                 W [out, in]
    aten.addmm(b, x, W.T)                 W [out, in]   (decomposed linear)
    aten.mm(x, W.T)                       W [out, in]
    aten.matmul(x, W.T)                   W [out, in]   (x @ W.T: Falcon's FalconLinear)
    aten.addmm(b, x, W)                   W [in, out]   (Conv1D)
    aten.mm(x, W) / aten.matmul(x, W)     W [in, out]

W.T is any spelling of a 2-D transpose (`t`, `numpy_T`, `permute(1, 0)`,
`transpose(0, 1)`: nm/transposes.py). Each becomes
`sparsecc::nm_linear(x, values, indices, b?)` over the weight read as [out, K]. Beta/alpha of addmm are not named in the patterns, so they must be
at their default 1. A weight that also feeds anything else (a tied embedding,
say) or that a MoE router reads is skipped with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from ..graph import VALUE_PRESERVING
from ..match import Const, Match, Op, Pattern, Var
from ..rewrite import CheckResult, fail, ok
from ..rewriter import Rewriter
from .compressed import NMWeights, layer_path
from .layerwise import LayerTarget
from .records import example_rows, nm_record
from .rule import NMRule
from .transposes import TransposedConst, is_transpose

aten = torch.ops.aten
_W, _WT, _X, _B = Const("w"), TransposedConst("w"), Var("x"), Var("b")


@dataclass(frozen=True)
class LinearForm:
    """One way a linear reaches the graph: the rule's name and pattern, the op it came from, the weight layout."""
    name: str
    pattern: Pattern
    source_op: str
    transposed: bool


LINEAR_FORMS = (
    LinearForm("nm-linear", Op(aten.linear.default, _X, _W, Var("b", optional=True)), "aten.linear", False),
    LinearForm("nm-addmm-t", Op(aten.addmm.default, _B, _X, _WT), "aten.addmm", False),
    LinearForm("nm-mm-t", Op(aten.mm.default, _X, _WT), "aten.mm", False),
    LinearForm("nm-matmul-t", Op(aten.matmul.default, _X, _WT), "aten.matmul", False),
    LinearForm("nm-addmm", Op(aten.addmm.default, _B, _X, _W), "aten.addmm", True),
    LinearForm("nm-mm", Op(aten.mm.default, _X, _W), "aten.mm", True),
    LinearForm("nm-matmul", Op(aten.matmul.default, _X, _W), "aten.matmul", True),
)
# Uses of a weight node this pass can rewrite consistently: (target, argument slot) -> layout.
_WEIGHT_SLOTS = {(aten.linear.default, 1): False, (aten.addmm.default, 2): True,
                 (aten.mm.default, 1): True, (aten.matmul.default, 1): True, (aten.conv2d.default, 1): False}
# A router's logits may reach sparsecc.moe through reshapes as well as casts.
_ROUTER_PATH = VALUE_PRESERVING + (aten.reshape.default, aten.view.default)
# Before moe-dispatch a router is found by the topk it feeds: scores, bias, group sums and views lie between.
_ROUTER_HOPS = 8
_EXPERT_CHOICE = (aten.topk.default, aten.max.dim)   # max: PhiMoE's sparsemixer picks experts one at a time
_MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
            aten.scaled_dot_product_attention.default)


def layouts_of(weight: Node) -> dict[Node, Optional[bool]]:
    """Layout in which each use reads `weight` (True = [in, out]); None for a use prune-nm cannot rewrite."""
    layouts = {}
    for user in weight.users:
        if is_transpose(user):
            for u in user.users:
                slot = _WEIGHT_SLOTS.get((u.target, u.args.index(user) if user in u.args else -1))
                layouts[u] = None if slot is None else not slot
        else:
            layouts[user] = _WEIGHT_SLOTS.get((user.target, user.args.index(weight) if weight in user.args else -1))
    return layouts


def feeds_moe_router(node: Node) -> bool:
    """Whether `node` is an MoE router: (through reshapes and casts) the router_logits of a `sparsecc::moe`,
    or, before moe-dispatch, what a `topk` (or sparsemixer's `max`) selects experts from within a few ops."""
    return _feeds_dispatched_router(node) or _feeds_topk(node)


def _feeds_dispatched_router(node: Node) -> bool:
    for user in node.users:
        if user.target is torch.ops.sparsecc.moe.default and user.args[1] is node:
            return True
        if user.target in _ROUTER_PATH and _feeds_dispatched_router(user):
            return True
    return False


def _feeds_topk(node: Node, hops: int = _ROUTER_HOPS) -> bool:
    """An expert choice within `hops` ops downstream of `node`, not past another matmul (softmax, bias, views)."""
    for user in node.users:
        if user.target in _EXPERT_CHOICE and _indices_used(user):
            return True
        if hops > 1 and user.target not in _MATMULS and _feeds_topk(user, hops - 1):
            return True
    return False


def _indices_used(choice: Node) -> bool:
    """The choice's indices (output 1) select something in the graph: a head whose argmax is only
    returned to the caller is not a router."""
    return any(item.target is operator.getitem and item.args[1] == 1 and any(u.op != "output" for u in item.users)
               for item in choice.users)


def _op_text(node: Node) -> str:
    return str(node.target).removesuffix(".default")


class LinearRule(NMRule):
    """Check, replace and calibration target of one linear form."""

    def __init__(self, weights: NMWeights, form: LinearForm):
        super().__init__(weights)
        self.form, self.rule_name, self.pattern = form, form.name, form.pattern

    def matrix(self, m: Match) -> torch.Tensor:
        """The weight as [out, K]."""
        w = self.weights.stored(m["w"])
        return w.t() if self.form.transposed else w

    def targets(self, m: Match) -> list[LayerTarget]:
        k, x = self.matrix(m).shape[1], m["x"]
        flip = (lambda w: w.t()) if self.form.transposed else (lambda w: w)
        return [LayerTarget(node=m.node, weight=m["w"], layer=layer_path(m["w"]),
                            columns=lambda values, _: values[x].reshape(-1, k), to_matrix=flip, from_matrix=flip,
                            between=tuple(m.nodes[1:]))]

    def weight_problem(self, m: Match) -> CheckResult:
        opts = self.weights.options
        if feeds_moe_router(m.node):
            return fail("router of an MoE block, kept dense: pruning it would change which experts tokens reach")
        w = self.weights.stored(m["w"])
        if w.dim() != 2 or not w.is_floating_point():
            return fail(f"weight is {w.dim()}-D {w.dtype}; prune-nm needs a 2-D floating-point weight")
        layouts = layouts_of(m["w"])
        others = sorted({_op_text(u) for u, layout in layouts.items() if layout is None})
        if others:
            return fail(f"weight is tied to {', '.join(others)}; pruning it would change that use too")
        if len(set(layouts.values())) > 1:
            return fail("weight is used both as [out, in] and [in, out]; one compressed layout cannot serve both")
        k = w.shape[0] if self.form.transposed else w.shape[1]
        if k % opts.m:
            return fail(f"reduction dim {k} is not divisible by M={opts.m} (pattern {opts.n}:{opts.m})")
        x = m.get("x")
        if isinstance(x, Node) and x.meta["val"].dtype != w.dtype:
            return fail(f"input dtype {x.meta['val'].dtype} differs from weight dtype {w.dtype}")
        return ok()

    def replace(self, m: Match, rw: Rewriter) -> Node:
        n, mm = self.weights.options.n, self.weights.options.m
        weight = self.matrix(m)
        values, indices = self.weights.compress(m["w"].target, weight, rw)
        keep = self.weights.options.keep
        out = rw.call(torch.ops.sparsecc.nm_linear.default, m["x"], values, indices, m.get("b"), n, mm,
                      weight.shape[1], **({"keep": keep} if keep != "memory" else {}))
        self.weights.ctx.records.append(self._record(m, weight, values, indices))
        return out

    def _record(self, m: Match, weight: torch.Tensor, values: Node, indices: Node):
        out_features, k = weight.shape
        flops = 2 * example_rows(m["x"].meta["val"], k) * out_features * k
        return nm_record(self.weights.gm, layer=layer_path(m["w"]), op="sparsecc.nm_linear",
                         source_op=self.form.source_op, n=self.weights.options.n, m=self.weights.options.m,
                         shape=[out_features, k], dense=[weight], compressed=[(values, indices)], flops=flops,
                         details=self.weights.layer_details(m["w"], values, indices, k, self.form.transposed))
