"""Read an MoE block's router off the graph: which experts each token picks, and with what weight.

A block's routing starts at its *selection*: the `aten.topk` whose indices pick the experts, or, for
PhiMoE's sparsemixer (no topk), the first `aten.max.dim` over the router logits. Walking back from it:

    topk(logits) -> softmax over the k          softmax, normalised (GraniteMoE, GPT-OSS)
    topk(softmax(logits) | sigmoid(logits))      Mixtral, Qwen, OLMoE; DeepSeek-V3 with sigmoid
    topk(masked_fill(scores + bias, ~groups))    group-limited: score-correction bias [E], n_group from
                                                 the [T, n_group, E/n_group] view, topk_group from the
                                                 top-k over the group scores
    max(logits), scatter(-inf), max again        sparsemixer; eps from the `gt(., 2 eps)` threshold

and forward from it: the weights are the top-k values or `gather(scores, indices)`, divided by their sum
(+ eps) when normalised, times a constant when a routed scaling factor is set. What the graph leaves
open (normalisation) is settled by confirming readings on numbers (dispatch.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.moe_routing import GROUP_SCORE_TOP

from ..graph import through_casts
from .regions import NotAnMoE, constant_of, users_through

aten = torch.ops.aten
SCORES = {aten.softmax.int: "softmax", aten._softmax.default: "softmax", aten.sigmoid.default: "sigmoid"}
SPARSEMIXER_TOP_K = 2   # PhiMoE's sparsemixer always picks two experts


@dataclass(frozen=True)
class Routing:
    """What `sparsecc::moe` needs to route like the block (see runtime/ops/moe.py for the math)."""
    router: Node                                  # the linear producing router logits [.., E]
    scoring: str                                  # softmax | sigmoid | sparsemixer
    normalize: bool
    top_k: int
    score_correction_bias: Optional[torch.Tensor] = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    sparsemixer_eps: float = 0.01

    def options(self) -> dict[str, Any]:
        """The op's routing keyword arguments that differ from their defaults."""
        found: dict[str, Any] = {}
        if self.score_correction_bias is not None:
            found["score_correction_bias"] = self.score_correction_bias
        if self.n_group > 1:
            found.update(n_group=self.n_group, topk_group=self.topk_group)
        if self.routed_scaling_factor != 1.0:
            found["routed_scaling_factor"] = self.routed_scaling_factor
        if self.scoring == "sparsemixer":
            found["sparsemixer_eps"] = self.sparsemixer_eps
        return found


def selection_nodes(gm: GraphModule) -> list[Node]:
    """Every topk, and every max over a linear's output (the sparsemixer's first pick)."""
    def sparsemixer_pick(node: Node) -> bool:
        return node.target is aten.max.dim and _linear_weight(gm, through_casts(node.args[0])) is not None
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and (n.target is aten.topk.default or sparsemixer_pick(n))]


def _linear_weight(gm: GraphModule, node: Node) -> Optional[torch.Tensor]:
    if isinstance(node, Node) and node.target is aten.linear.default:
        return constant_of(gm, through_casts(node.args[1]))
    return None


def read_routing(gm: GraphModule, selection: Node) -> Routing:
    """The block's routing, read from its selection node (see the module docstring)."""
    if selection.target is aten.max.dim:
        return _sparsemixer(gm, selection)
    choice, top_k = through_casts(selection.args[0]), int(selection.args[1])
    groups = _group_limit(choice)
    masked, choice = (choice, choice.args[0]) if groups else (None, choice)
    bias, scores = _correction_bias(gm, choice)
    if masked is not None:
        _check_group_fill(masked, bias, top_k, *groups)
    if scores.target in SCORES:
        router, scoring = through_casts(scores.args[0]), SCORES[scores.target]
        weights = _routing_weights(selection, scores)
        normalize = _normalizer(weights) is not None
    else:  # top-k of the raw logits, then softmax over the k: normalised softmax weights
        router, scoring, normalize, weights = scores, "softmax", True, _routing_weights(selection, scores)
    if _linear_weight(gm, router) is None:
        raise NotAnMoE("the topk is not fed by a linear router with a constant weight")
    n_group, topk_group = groups or (1, 1)
    return Routing(router, scoring, normalize, top_k, bias, n_group, topk_group, _scaling_factor(weights))


def _sparsemixer(gm: GraphModule, first: Node) -> Routing:
    router = through_casts(first.args[0])
    thresholds = [u.args[1] for u in _downstream(router, 6) if u.target is aten.gt.Scalar]
    if not thresholds:
        raise NotAnMoE("a max over the router logits with no sparsemixer threshold (gt) after it")
    return Routing(router, "sparsemixer", False, SPARSEMIXER_TOP_K, sparsemixer_eps=float(thresholds[0]) / 2)


def _downstream(node: Node, depth: int) -> list[Node]:
    """Nodes reached from `node` in at most `depth` steps, nearest first."""
    seen, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen += frontier
    return seen


def _group_limit(choice: Node) -> Optional[tuple[int, int]]:
    """(n_group, topk_group) when `choice` masks the experts outside each token's best groups."""
    if choice.target not in (aten.masked_fill.Scalar, aten.masked_fill_.Scalar):
        return None
    mask_inputs = _upstream(choice.args[1], stop=choice.args[0])
    experts = choice.meta["val"].shape[-1]
    for node in mask_inputs:
        if node.target is aten.topk.default:
            n_group = node.args[0].meta["val"].shape[-1]
            if 1 < n_group < experts and experts % n_group == 0 and _sums_best_two(node.args[0]):
                return int(n_group), int(node.args[1])
    raise NotAnMoE("the router masks experts before its topk, but not by a top-k over expert groups each scored "
                   f"by the sum of its best {GROUP_SCORE_TOP} experts")


def _sums_best_two(group_scores: Node) -> bool:
    """`group_scores` = topk(grouped choice, GROUP_SCORE_TOP).values.sum(-1), as sparsecc.moe scores a group."""
    if group_scores.target is not aten.sum.dim_IntList or list(group_scores.args[1]) not in ([-1], [2]):
        return False
    values = group_scores.args[0]
    if values.target is not operator.getitem or values.args[1] != 0:
        return False
    best = values.args[0]
    largest = best.args[3] if len(best.args) > 3 else best.kwargs.get("largest", True)
    return best.target is aten.topk.default and best.args[1] == GROUP_SCORE_TOP and largest is True and \
        (best.args[2] if len(best.args) > 2 else -1) in (-1, 2)


def _check_group_fill(masked: Node, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int) -> None:
    """sparsecc.moe drops the experts outside the best groups (-inf). A model filling them with 0.0 (DeepSeek-V3)
    picks the same experts when every kept one scores above 0 and enough are kept: scores are > 0 (softmax,
    sigmoid), so that holds when the correction bias is >= 0. Otherwise the reading is refused."""
    fill = masked.args[2]
    experts = masked.meta["val"].shape[-1]
    if top_k > topk_group * experts // n_group:
        raise NotAnMoE(f"the router keeps {topk_group} of {n_group} expert groups, fewer experts than its top-{top_k}")
    if fill == float("-inf"):
        return
    if fill != 0.0:
        raise NotAnMoE(f"the router fills experts outside its best groups with {fill}, not -inf or 0")
    if bias is not None and float(bias.min()) < 0:
        raise NotAnMoE("the router fills experts outside its best groups with 0 while a negative score-correction "
                       "bias can score kept experts below 0: sparsecc.moe would pick other experts")


def _upstream(node: Node, stop: Node) -> list[Node]:
    """`node` and what it reads, back to (not through) `stop`."""
    seen, stack = [node], [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp is not stop and inp not in seen:
                seen.append(inp)
                stack.append(inp)
    return seen


def _correction_bias(gm: GraphModule, choice: Node) -> tuple[Optional[torch.Tensor], Node]:
    """(the [E] constant added to the scores for selection only, DeepSeek-V3's e_score_correction_bias;
    the scores), or (None, choice) when `choice` is not scores plus such a constant."""
    if choice.target is not aten.add.Tensor or not all(isinstance(a, Node) for a in choice.args[:2]):
        return None, choice
    experts = choice.meta["val"].shape[-1]
    for bias, scores in (choice.args[:2], choice.args[1::-1]):
        value = constant_of(gm, through_casts(bias))
        if value is not None and value.shape == (experts,):
            return value, through_casts(scores)
    return None, choice


def _routing_weights(selection: Node, scores: Node) -> Optional[Node]:
    """The [T, k] weights: `gather(scores, indices)` when the block reads them so, else the topk values."""
    indices = [u for u in selection.users if u.args[1] == 1]
    for user in users_through(indices[0]) if indices else []:
        if user.target is aten.gather.default and through_casts(user.args[0]) is scores:
            return user
    values = [u for u in selection.users if u.args[1] == 0]
    return values[0] if values else None


def _normalizer(weights: Optional[Node]) -> Optional[Node]:
    """The division of the weights by their sum (plus an eps, DeepSeek-V3), if any."""
    for user in users_through(weights) if weights is not None else []:
        if user.target in (aten.div.Tensor, aten.div_.Tensor) and isinstance(user.args[1], Node):
            divisor = user.args[1]
            if divisor.target is aten.add.Tensor and isinstance(divisor.args[0], Node):
                divisor = divisor.args[0]
            if divisor.target is aten.sum.dim_IntList:
                return user
    return None


def _scaling_factor(weights: Optional[Node]) -> float:
    """The constant the (normalised) weights are multiplied by: DeepSeek-V3's routed_scaling_factor."""
    if weights is None:
        return 1.0
    after = _normalizer(weights) or weights
    for user in users_through(after):
        if user.target in (aten.mul.Tensor, aten.mul_.Tensor) and isinstance(user.args[1], (int, float)):
            return float(user.args[1])
    return 1.0


__all__ = ["Routing", "read_routing", "selection_nodes"]
