"""Recognise attention in a captured graph and read off q, k, v, the boolean mask and the scale.

Two shapes reach us:

    aten.scaled_dot_product_attention(q, k, v, mask?, scale=?, enable_gqa=?)     (bool or additive mask)
    matmul(softmax(matmul(q, k^T) * s + mask, -1), v)                             (eager; casts/dropout between)

with two eager variants transformers writes:

    softcap (Gemma2)  the scores are tanh(scores / c) * c before the mask is added
    sinks (GPT-OSS)   softmax(cat([scores, expand(sinks [1, H, 1, 1])], -1) - max)[..., :-1]: one learned
                      logit per head joins each row's softmax and its column is dropped after it

An additive mask counts only when it is a boolean mask in disguise,
`where(visible, 0, min)` as transformers builds it; k and v are read through
`repeat_kv` (`reshape(expand(unsqueeze(kv, 2)))`) so grouped-query attention
never needs the repeated tensors.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from ..graph import layer_name, through_casts
from ..match import AnyArg, Lit, Op, Var, match
from ..region import NotARegion, ancestors
from .mask_rule import MaskRule

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
    softcap: float = 0.0       # logits capped as softcap * tanh(logit / softcap); 0 = not capped
    sinks: Optional[Node] = None  # [1, H, 1, 1] learned sink logit per query head, or None
    rule: Optional[MaskRule] = None  # the mask read as a rule (`mask_rule`), or None ...
    no_rule: str = ""                # ... and then why not

    @property
    def layer(self) -> str:
        return layer_name(self.root)

    @property
    def output(self) -> Node:
        return self.root

    @property
    def nodes(self) -> list[Node]:
        """The calls only this attention needs: what leads to the root and not to q, k, v or the mask."""
        inputs = ancestors(n for n in (self.q, self.k, self.v, self.mask, self.sinks) if n is not None)
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


def _last_dim(dim, rank: int) -> bool:
    return dim in (-1, rank - 1)


def sink_column_dropped(probs: Node) -> tuple[Node, bool]:
    """(the softmax, True) when `probs` is softmax(...)[..., :-1] (or [..., :Skv]), else (probs, False)."""
    if probs.target is not aten.slice.Tensor or not _last_dim(probs.args[1], probs.meta["val"].dim()):
        return probs, False
    softmax, (start, end, step) = through_casts(probs.args[0]), (tuple(probs.args[2:5]) + (0, None, 1)[
        len(probs.args[2:5]):])
    width = softmax.meta["val"].shape[-1]
    if start != 0 or end not in (-1, width - 1) or step != 1:
        raise NotAttention("the softmax output is sliced other than dropping its last (sink) column")
    return softmax, True


def unshifted(scores: Node) -> Node:
    """x for x - max(x, -1, keepdim)[0]: softmax is shift invariant, transformers subtracts it for range."""
    if scores.target is not aten.sub.Tensor or not isinstance(scores.args[1], Node):
        return scores
    row_max = scores.args[1]
    reduced = row_max.args[0] if row_max.target is operator.getitem and row_max.args[1] == 0 else row_max
    if reduced.target not in (aten.max.dim, aten.amax.default) or reduced.args[0] is not scores.args[0]:
        return scores
    dims = reduced.args[1] if len(reduced.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keepdim = reduced.args[2] if len(reduced.args) > 2 else reduced.kwargs.get("keepdim", False)
    # only a max over the softmax's own (last) dim is constant along it: subtracting it changes nothing
    rank = scores.meta["val"].dim()
    return through_casts(scores.args[0]) if len(dims) == 1 and _last_dim(dims[0], rank) and keepdim else scores


def split_sinks(scores: Node) -> tuple[Node, Node]:
    """(scores, sink logits [1, H, 1, 1]) of cat([scores, expand(sinks)], -1) with one sink column."""
    if scores.target is not aten.cat.default or len(scores.args[0]) != 2 or not _last_dim(
            scores.args[1] if len(scores.args) > 1 else 0, scores.meta["val"].dim()):
        raise NotAttention("the softmax drops its last column, but that column is not concatenated sink logits")
    kept, sinks = scores.args[0]
    sinks = through_casts(sinks)
    sinks = through_casts(sinks.args[0]) if sinks.target is aten.expand.default else sinks
    shape, heads = list(sinks.meta["val"].shape), kept.meta["val"].shape[1]
    if [1] * (4 - len(shape)) + shape != [1, heads, 1, 1]:
        raise NotAttention(f"the sink logits {shape} are not one logit per head [1, {heads}, 1, 1]")
    return through_casts(kept), sinks


def uncapped(scores: Node) -> tuple[Node, float]:
    """(x, c) for tanh(x / c) * c (Gemma2's logit softcapping), else (scores, 0.0)."""
    if scores.target is not aten.mul.Tensor or not isinstance(scores.args[1], (int, float)):
        return scores, 0.0
    tanh = through_casts(scores.args[0])
    if tanh.target is not aten.tanh.default:
        return scores, 0.0
    inner, cap = through_casts(tanh.args[0]), float(scores.args[1])
    divisor = inner.args[1] if inner.target is aten.div.Tensor else None
    if inner.target is aten.mul.Tensor and isinstance(inner.args[1], (int, float)) and inner.args[1]:
        divisor = 1.0 / inner.args[1]
    if not isinstance(divisor, (int, float)) or cap <= 0 or not math.isclose(divisor, cap, rel_tol=1e-6):
        raise NotAttention(f"the scores pass through tanh, but not as softcapping tanh(x / c) * c (c = {cap})")
    return through_casts(inner.args[0]), cap


def eager_site(node: Node) -> AttentionSite:
    """`node` = matmul(probs, v); walks back to the scores, the mask, softcapping and sink logits."""
    probs, sliced = sink_column_dropped(through_casts(node.args[0]))
    if probs.target not in (aten.softmax.int, aten._softmax.default) or not _last_dim(probs.args[1],
                                                                                      probs.meta["val"].dim()):
        raise NotAttention("the matmul's left operand is not a softmax over the last dim")
    scores, mask, sinks = unshifted(through_casts(probs.args[0])), None, None
    if sliced:
        scores, sinks = split_sinks(scores)
    if scores.target is aten.add.Tensor:
        scores, mask = through_casts(scores.args[0]), scores.args[1]
    scores, softcap = uncapped(scores)
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
                         boolean_mask(mask), float(scale), "eager", softcap, sinks)


def attention_site(node: Node) -> Optional[AttentionSite]:
    """The attention rooted at `node`, None when `node` cannot be the root of one."""
    if node.target is aten.scaled_dot_product_attention.default:
        return sdpa_site(node)
    if node.target is aten.matmul.default and isinstance(node.args[0], Node):
        head = through_casts(node.args[0])
        if head.target is aten.slice.Tensor:  # softmax(...)[..., :-1]: GPT-OSS drops the sink column
            head = through_casts(head.args[0])
        if head.target in (aten.softmax.int, aten._softmax.default):
            return eager_site(node)
    return None


__all__ = ["AttentionSite", "NotAttention", "attention_site", "boolean_mask", "eager_site", "sdpa_site",
           "sink_column_dropped", "split_sinks", "uncapped", "unrepeat", "unshifted"]
