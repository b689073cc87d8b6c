"""Recognise attention in a captured graph and read off q, k, v, the boolean mask and the scale.

Two shapes reach us:

    aten.scaled_dot_product_attention(q, k, v, mask?, scale=?, enable_gqa=?)     (bool or additive mask)
    matmul(softmax(matmul(q, k^T) * s + mask, -1), v)                             (eager; casts/dropout between)

An additive mask counts only when it is a boolean mask in disguise,
`where(visible, 0, min)` as transformers builds it; k and v are read through
`repeat_kv` (`reshape(expand(unsqueeze(kv, 2)))`) so grouped-query attention
never needs the repeated tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from ..graph import layer_name, through_casts
from ..match import AnyArg, Lit, Op, Var, match
from ..region import NotARegion, ancestors

aten = torch.ops.aten
REPEAT_KV = Op(aten.reshape.default, Op(aten.expand.default, Op(aten.unsqueeze.default, Var("kv"), Lit(2)), AnyArg()),
               AnyArg())
WHERE_MASK = Op(aten.where.ScalarOther, Var("visible"), AnyArg(), Var("fill"))


class NotAttention(NotARegion):
    """The node is not attention this rewrite can take over; the message says why."""


@dataclass
class AttentionSite:
    root: Node                 # the node producing the attention output
    q: Node
    k: Node                    # [B, Hkv, Skv, D], before any repeat_kv
    v: Node
    mask: Optional[Node]       # boolean [B|1, H|1, S, Skv], True = may attend
    scale: float
    form: str                  # "sdpa" | "eager"

    @property
    def layer(self) -> str:
        return layer_name(self.root)

    @property
    def output(self) -> Node:
        return self.root

    @property
    def nodes(self) -> list[Node]:
        """The calls only this attention needs: what leads to the root and not to q, k, v or the mask."""
        inputs = ancestors(n for n in (self.q, self.k, self.v, self.mask) if n is not None)
        own = ancestors([self.root]) - inputs
        return [n for n in self.root.graph.nodes if n in own and n.op == "call_function"]


def unrepeat(node: Node) -> Node:
    found = match(REPEAT_KV, node)
    return found["kv"] if found else node


def boolean_mask(mask: Optional[Node]) -> Optional[Node]:
    """The boolean mask behind `mask`; raises NotAttention for other additive masks."""
    if mask is None or mask.meta["val"].dtype == torch.bool:
        return mask
    found = match(WHERE_MASK, through_casts(mask))
    if found is None or not isinstance(found["fill"], float) or found["fill"] > -1e30:
        raise NotAttention("the additive mask is not a boolean mask (where(visible, 0, min)); "
                           "other biases (ALiBi, relative positions) are not block-sparse")
    return found["visible"]


def _scale_of(q: Node, scale) -> float:
    return float(scale) if scale is not None else q.meta["val"].shape[-1] ** -0.5


def sdpa_site(node: Node) -> AttentionSite:
    args = dict(zip(("q", "k", "v", "mask", "dropout_p", "is_causal"), node.args))
    args.update(node.kwargs)
    if args.get("dropout_p", 0.0) or args.get("is_causal", False):
        raise NotAttention("dropout or is_causal=True attention is left to SDPA (it already skips masked blocks)")
    q = args["q"]
    return AttentionSite(node, q, unrepeat(args["k"]), unrepeat(args["v"]), boolean_mask(args.get("mask")),
                         _scale_of(q, args.get("scale")), "sdpa")


def eager_site(node: Node) -> AttentionSite:
    """`node` = matmul(probs, v); walks back to the scores and the mask."""
    probs = through_casts(node.args[0])
    if probs.target not in (aten.softmax.int, aten._softmax.default) or probs.args[1] not in (-1, 3):
        raise NotAttention("the matmul's left operand is not a softmax over the last dim")
    scores, mask = through_casts(probs.args[0]), None
    if scores.target is aten.add.Tensor:
        scores, mask = through_casts(scores.args[0]), scores.args[1]
    scale = 1.0
    if scores.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(scores.args[1], (int, float)):
        scale = scores.args[1] if scores.target is aten.mul.Tensor else 1.0 / scores.args[1]
        scores = scores.args[0]
    if scores.target is not aten.matmul.default:
        raise NotAttention("the softmax does not read q @ k^T")
    key_t = scores.args[1]
    if key_t.target is not aten.transpose.int or sorted(d % 4 for d in key_t.args[1:]) != [2, 3]:
        raise NotAttention("the scores do not multiply by k transposed over its last two dims")
    return AttentionSite(node, scores.args[0], unrepeat(key_t.args[0]), unrepeat(node.args[1]),
                         boolean_mask(mask), float(scale), "eager")


def attention_site(node: Node) -> Optional[AttentionSite]:
    """The attention rooted at `node`, None when `node` cannot be the root of one."""
    if node.target is aten.scaled_dot_product_attention.default:
        return sdpa_site(node)
    if node.target is aten.matmul.default and isinstance(node.args[0], Node):
        head = through_casts(node.args[0])
        if head.target in (aten.softmax.int, aten._softmax.default):
            return eager_site(node)
    return None


__all__ = ["AttentionSite", "NotAttention", "attention_site", "boolean_mask", "eager_site", "sdpa_site",
           "unrepeat"]
