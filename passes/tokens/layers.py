"""`where="layer"`: whole decoder layers as routed blocks (attention and MLP skipped together).

A layer is an MLP residual block (`blocks`) whose residual input
is, through dtype casts, an attention residual add `h1 = h0 + attn(norm(h0), ...)`,
or a parallel-residual block (`parallel`) from its own input h0.
The block runs from h0 to the MLP's add. Nodes made inside the layer's module
from inputs outside it (rotary `unsqueeze(cos, 1)`) are pulled into the body, so
what the body reads from outside is the model-level per-position tables
([B|1, S, d]: cos, sin, position ids) and the attention mask ([B|1, H|1, S, S]).
Routing gathers those for the kept tokens; any other outside input makes the
layer unroutable, with the reason.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..graph import in_module, module_path, through_casts
from .blocks import (
    NotRoutable,
    ResidualBlock,
    body_between,
    check_closed,
    common_module,
    describe,
    is_matmul,
    mixes_tokens,
    outside_inputs,
    router_source,
)
from .body_copy import input_kind
from .parallel import find_mlp_blocks

aten = torch.ops.aten


def _attention_residual(mid: Node) -> Node:
    """h0 of `mid = h0 + attn(...)`."""
    if mid.target is not aten.add.Tensor:
        raise NotRoutable("the MLP's residual input is not the output of an attention residual add")
    for h0, update in ((mid.args[0], mid.args[1]), (mid.args[1], mid.args[0])):
        if isinstance(h0, Node) and isinstance(update, Node):
            body = body_between(h0, mid)
            if update in body and any(mixes_tokens(n) for n in body):
                return h0
    raise NotRoutable("no attention residual block precedes the MLP")


def _pull_layer_inputs(body: list[Node], residual: Node, layer: str) -> list[Node]:
    """The body plus the nodes the layer's module makes from outside inputs (rotary unsqueezes)."""
    members = set(body)
    while True:
        inner = [n for n in outside_inputs(list(members), residual)
                 if n.op == "call_function" and layer and in_module(n, layer)]
        if not inner:
            break
        members.update(inner)
    return [n for n in residual.graph.nodes if n in members]


def layer_block(mlp: ResidualBlock) -> ResidualBlock:
    """The decoder layer around MLP block `mlp`: from the attention block's input (the parallel block's own
    input when attention is a bypass branch of it) to the MLP's add."""
    h0 = mlp.residual if mlp.bypass else _attention_residual(through_casts(mlp.residual))
    layer = module_path(mlp.output)
    body = _pull_layer_inputs(body_between(h0, mlp.output), h0, layer)
    check_closed(body, mlp.output)
    shape = h0.meta["val"].shape
    batch, seq = int(shape[0]), int(shape[1])
    extras = outside_inputs(body, h0)
    kinds = [input_kind(e, batch, seq) for e in extras]
    for extra, kind in zip(extras, kinds):
        if not kind:
            shown = list(extra.meta["val"].shape) if hasattr(extra.meta.get("val"), "shape") else "?"
            raise NotRoutable(f"the layer reads {describe(extra)} {shown}, which is neither a per-position table "
                              f"[B|1, S, ...] nor an attention mask [B|1, H|1, S, S]")
    path = common_module([n for n in body if is_matmul(n)])
    return ResidualBlock(path, "layer", h0, mlp.output, body, router_source(body, h0), extras, kinds)


def find_layer_blocks(gm: GraphModule) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
    """(decoder layers in graph order, (where, reason) for MLP blocks that are not inside a routable layer)."""
    mlps, misses = find_mlp_blocks(gm)
    blocks = []
    for mlp in mlps:
        try:
            blocks.append(layer_block(mlp))
        except NotRoutable as err:
            misses.append((module_path(mlp.output) or mlp.path, str(err)))
    return blocks, misses


__all__ = ["find_layer_blocks", "layer_block"]
