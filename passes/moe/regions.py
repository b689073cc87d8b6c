"""Find mixture-of-experts blocks in a captured graph and read off what a dispatch needs.

A block is found from its router's selection (`aten.topk`, or the sparsemixer's
`aten.max`; see routing.py): the innermost module around it whose region (nodes
made inside it, by `nn_module_stack`) also holds the expert weights, either
stacked 3-D constants `[E, ., .]` (transformers 5.x `grouped_mm` / `batched_mm`
forms) or E numbered expert submodules of linears (`experts.0.w1` ...: the
classic loop and the dense formulation). Structure gives the candidates;
`moe.dispatch` confirms one by running it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..fake import resolve_attr
from ..graph import VALUE_PRESERVING, module_path, module_paths, nodes_in_module
from ..region import NotARegion

aten = torch.ops.aten
ACTIVATIONS = {aten.silu.default: "silu", aten.relu.default: "relu", aten.gelu.default: "gelu"}


class NotAnMoE(NotARegion):
    """The region is not a dispatchable MoE block; the message says why."""


class NoExpertWeights(NotAnMoE):
    """No module around the router's selection holds experts: not an MoE candidate at all."""


@dataclass
class MLPWeights:
    """One gated (`down(act(gate x) * up x)`) or plain (`down(act(up x))`) MLP."""
    gate_up: torch.Tensor              # [2I, H] gate rows first when gated, else [I, H]
    down: torch.Tensor                 # [H, I]
    gated: bool
    activation: str
    sources: list[str] = field(default_factory=list)


def constant_of(gm: GraphModule, node) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads, None for any other argument."""
    if isinstance(node, Node) and node.op == "get_attr":
        value = resolve_attr(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def region_constants(gm: GraphModule, region: list[Node]) -> dict[str, torch.Tensor]:
    """The constant tensors the region's nodes read, by attribute name."""
    consts = {}
    for node in region:
        for arg in node.all_input_nodes:
            value = constant_of(gm, arg)
            if value is not None:
                consts[arg.target] = value
    return consts


def expert_index(path: str, block: str) -> Optional[str]:
    """'mlp.experts.3.w1' inside 'mlp' -> 'mlp.experts.3' (the expert's own module)."""
    rest = path[len(block):].lstrip(".") if block else path
    found = re.match(r"((?:[^.]+\.)*?\d+)(?:\.|$)", rest)
    return f"{block}.{found.group(1)}".lstrip(".") if found else None


def find_block(gm: GraphModule, selection: Node,
               modules: Optional[dict[str, list[Node]]] = None) -> tuple[str, list[Node]]:
    """The innermost module around the router's `selection` whose region holds expert weights;
    `modules` (graph.module_index of `gm`) spares a walk of the graph per block."""
    for path in reversed(module_paths(selection)):
        region = list(modules.get(path, ())) if modules is not None else nodes_in_module(gm, path)
        stacked = [v for v in region_constants(gm, region).values() if v.dim() == 3]
        experts = {expert_index(module_path(n), path) for n in region if n.target is aten.linear.default}
        if len(stacked) >= 2 or len(experts - {None}) >= 2:
            return path, region
    raise NoExpertWeights("no module around the router's top-k holds expert weights "
                          "(stacked [E, ., .] or numbered experts)")


def users_through(node: Node) -> list[Node]:
    """The users of `node`, looking forward through casts and copies (VALUE_PRESERVING)."""
    users = []
    for user in node.users:
        users += users_through(user) if user.target in VALUE_PRESERVING else [user]
    return users


def find_output(block_path: str, region: list[Node], hidden: Node, router: Node) -> Node:
    """The region's result: the last node used outside the region with the tokens' width."""
    inside = set(region)
    width = hidden.meta["val"].shape[-1]
    outs = [n for n in region if n is not router and any(u not in inside for u in n.users)
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].shape[-1] == width]
    if not outs:
        raise NotAnMoE(f"no result of width {width} leaves module '{block_path}'")
    return outs[-1]


def block_form(region: list[Node], stacked: bool) -> str:
    targets = {n.target for n in region}
    if stacked:
        return "batched_mm" if aten.bmm.default in targets else "grouped_mm"
    loop_ops = {aten.nonzero.default, aten.where.default, aten.index_add_.default, aten.index_add.default}
    return "loop" if targets & loop_ops else "dense"


__all__ = ["ACTIVATIONS", "MLPWeights", "NoExpertWeights", "NotAnMoE", "block_form", "constant_of", "expert_index",
           "find_block", "find_output", "region_constants", "users_through"]
