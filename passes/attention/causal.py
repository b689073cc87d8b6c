"""Causal SDPA as an explicit mask, so the lossy attention policies can narrow it."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..rewriter import Rewriter


def causal_sdpa_as_mask(gm: GraphModule) -> dict[Node, tuple[tuple, dict]]:
    """Give every SDPA call with is_causal=True (no mask, no dropout, S == Skv) the explicit boolean
    causal mask it implies, `arange(S)[None, :] <= arange(S)[:, None]`, and is_causal=False: the same
    attention, now a site the lossy policies narrow. Returns each changed call's original (args, kwargs)
    so a site left dense can get them back (the unused mask nodes go with the next cleanup)."""
    changed = {}
    aten = torch.ops.aten
    for node in [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]:
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
        args.update(node.kwargs)
        q, k = args["query"].meta["val"], args["key"].meta["val"]
        if not args.get("is_causal") or args.get("attn_mask") is not None or args.get("dropout_p", 0.0):
            continue
        seq, keys = q.shape[-2], k.shape[-2]
        if not (isinstance(seq, int) and isinstance(keys, int) and seq == keys):
            continue  # SDPA's is_causal is top-left aligned; the layout's causal rule is bottom-right
        rw = Rewriter(gm, node)
        positions = rw.call(aten.arange.default, seq, device=q.device)
        mask = rw.call(aten.le.Tensor, rw.call(aten.unsqueeze.default, positions, 0),
                       rw.call(aten.unsqueeze.default, positions, 1))
        mask = rw.call(aten.unsqueeze.default, rw.call(aten.unsqueeze.default, mask, 0), 0)
        extra = {name: value for name, value in node.kwargs.items() if name in ("scale", "enable_gqa")}
        changed[node] = (node.args, dict(node.kwargs))
        node.args = (args["query"], args["key"], args["value"], mask, 0.0, False)
        node.kwargs = extra
    return changed


__all__ = ["causal_sdpa_as_mask"]
