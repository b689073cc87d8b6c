"""Why a weight stays dense: every >= 2-D floating-point constant no prune-nm rule matched gets a reason.

The rules explain the layers they matched and declined (shape not divisible
by M, excluded, feeds a router, tied). What no rule matched would otherwise
pass in silence, so after the rules run each remaining weight is named with
what reads it:

    stacked [E, out, in] / [E, in, out] expert weights (batched_mm, grouped_mm, a loop)
        -> moe-dispatch did not rewrite their block (a weights request runs it; the expert rule prunes
           them inside sparsecc.moe)
    an MoE router read through a cast  -> kept dense, like the routers the linear rules decline
    an embedding table, expert biases  -> a lookup, not a matmul
    anything else                      -> the ops that read it
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..graph import VALUE_PRESERVING
from ..manager import Skip
from ..state import state_targets
from .compressed import NMWeights, layer_path
from .linear import feeds_moe_router

aten = torch.ops.aten
RULE = "nm-dense-weights"
# Row lookups: an embedding table, or per-expert biases [E, n] selected by expert index.
_LOOKUPS = (aten.embedding.default, aten.index_select.default, aten.index.Tensor)
_PASS_THROUGH = VALUE_PRESERVING + (aten.view.default, aten.reshape.default, aten.expand.default, aten.t.default,
                                    aten.numpy_T.default, aten.transpose.int, aten.permute.default,
                                    aten.unsqueeze.default)


def _readers(weight: Node) -> list[Node]:
    """The nodes reading `weight`, looking through views, transposes and casts."""
    readers, stack = [], list(weight.users)
    while stack:
        user = stack.pop()
        if user.target in _PASS_THROUGH:   # a transpose left dead by a rewrite reads nothing on
            stack.extend(user.users)
        elif user not in readers:
            readers.append(user)
    return readers


def dense_reason(weights: NMWeights, weight: Node, tensor: torch.Tensor, readers: list[Node]) -> str:
    """Why `weight` (a get_attr of `tensor`, read by `readers`) was not made N:M."""
    chosen = weights.options.selects(layer_path(weight))
    if not chosen:
        return chosen.reason
    ops = ", ".join(sorted({str(r.target).removesuffix(".default") for r in readers}))
    if any(feeds_moe_router(r) for r in readers):
        return "router of an MoE block, kept dense: pruning it would change which experts tokens reach"
    if any(r.target is torch.ops.sparsecc.moe.default for r in readers) and tensor.dim() == 2:
        k, m = tensor.shape[-1], weights.options.m
        if tensor.shape[0] == 1:
            return f"shared-expert gate {list(tensor.shape)} of sparsecc.moe (one output row): kept dense"
        why = f"its reduction dim {k} is not divisible by M={m}" if k % m else "outside the include/exclude globs"
        return f"shared expert {list(tensor.shape)} of sparsecc.moe, kept dense: {why}"
    if tensor.dim() >= 3:
        return (f"stacked expert weights {list(tensor.shape)} read by {ops}: prune-nm makes experts N:M "
                "only inside sparsecc.moe, and moe-dispatch did not rewrite this block (its reason is in the "
                "report; a pipeline without moe-dispatch never does)")
    if any(r.target in _LOOKUPS for r in readers):
        return f"table {list(tensor.shape)} read by {ops} (a lookup, not a matmul): kept dense"
    return (f"read by {ops}: not a linear form prune-nm rewrites (linear, or matmul/mm/addmm of an activation "
            "with a constant or transposed constant, conv2d)")


def unexplained_dense(gm: GraphModule, weights: NMWeights, explained: set[str]) -> list[Skip]:
    """A Skip for every >= 2-D floating-point weight still read densely whose layer has no reason yet.
    Program state (a KV cache the graph writes) is data, not a weight: never listed."""
    compressed = {name for pair in weights.compressed.values() for name in pair}
    compressed |= set(state_targets(gm))
    skips, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users or node.target in compressed or node.target in seen:
            continue
        tensor = weights.stored(node)
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 2):
            continue
        seen.add(node.target)
        layer, readers = layer_path(node), _readers(node)
        if not readers or layer in explained or (tensor.dim() >= 3 and layer + ".experts" in explained):
            continue
        where = f"{layer} ({node.target.rpartition('.')[2]})"
        skips.append(Skip(where, RULE, dense_reason(weights, node, tensor, readers)))
    return skips
