"""A reading of an MoE block: the `sparsecc::moe` call that would reproduce it.

`dispatch` runs a reading eagerly on recorded values (to confirm it);
`insert_dispatch` puts the confirmed one into the graph before the block's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..rewriter import RewriteError, Rewriter
from .block import MoEBlock
from .experts import mlp_provenance
from .routing import Routing

aten = torch.ops.aten


@dataclass(frozen=True)
class Reading:
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    gated: bool
    routing: Routing
    b_gate_up: Optional[torch.Tensor] = None
    b_down: Optional[torch.Tensor] = None
    gate_up_from: Any = None           # provenance of w_gate_up and w_down (experts.py)
    down_from: Any = None

    @property
    def normalize(self) -> bool:
        return self.routing.normalize


def options(block: MoEBlock, reading: Reading) -> dict[str, Any]:
    """The op's keyword arguments past capacity_factor that this reading sets (the rest keep defaults)."""
    biases = {k: v for k, v in (("b_gate_up", reading.b_gate_up), ("b_down", reading.b_down)) if v is not None}
    return {**reading.routing.options(), **block.expert_form.options(), **biases}


def _positional(block: MoEBlock, reading: Reading) -> tuple:
    """The arguments after the tensors: top_k .. gated."""
    return block.routing.top_k, reading.normalize, reading.routing.scoring, block.expert_form.activation, reading.gated


def dispatch(block: MoEBlock, reading: Reading, hidden: torch.Tensor, logits: torch.Tensor,
             capacity_factor: float) -> torch.Tensor:
    shared = block.shared
    return torch.ops.sparsecc.moe(
        hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]),
        reading.w_gate_up, reading.w_down,
        shared.gate_up if shared else None, shared.down if shared else None, block.shared_gate,
        *_positional(block, reading), capacity_factor, **options(block, reading))


def _flat(rw: Rewriter, node: Node) -> Node:
    """`node` as 2-D [rows, width]; a no-op when it already is."""
    val = node.meta["val"]
    return node if val.dim() == 2 else rw.call(aten.reshape.default, node, [-1, val.shape[-1]])


def _shaped_like(rw: Rewriter, flat: Node, block: MoEBlock) -> Node:
    """The [T, H] result back in the block output's shape and dtype."""
    want = block.output.meta["val"]
    out = flat
    if want.dim() != 2:
        same = block.hidden.meta["val"].shape == want.shape
        out = rw.call(aten.view_as.default, out, block.hidden) if same else \
            rw.call(aten.reshape.default, out, _shape_args(rw, want.shape))
    if want.dtype != out.meta["val"].dtype:
        out = rw.call(aten.to.dtype, out, want.dtype)
    return out


def _shape_args(rw: Rewriter, shape: torch.Size) -> list:
    """`shape` as reshape arguments: ints, and for a dynamic dim a node computing it, so the rewrite keeps
    the dims the model was compiled dynamic in (an int would fix them to the example's size)."""
    args = []
    for dim in shape:
        expr = dim.node.expr if isinstance(dim, torch.SymInt) else None
        args.append(int(dim) if expr is None or expr.is_number else _size_node(rw, expr))
    return args


def _size_node(rw: Rewriter, expr) -> Node:
    """A node whose value is the symbolic size `expr`: one the graph has, else sym_size of an input."""
    for node in rw.graph.nodes:
        if node is rw.root:
            break
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and val.node.expr == expr and node.op != "placeholder":
            return node
    for node in rw.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            for index, dim in enumerate(val.shape):
                if isinstance(dim, torch.SymInt) and dim.node.expr == expr:
                    return rw.call(aten.sym_size.int, node, index)
    raise RewriteError(f"no node of the graph computes the dynamic size {expr}")


def insert_dispatch(gm: GraphModule, block: MoEBlock, reading: Reading,
                    capacity_factor: float) -> tuple[Node, dict[str, Any]]:
    """The dispatch's result node, and the provenance of each expert weight constant it added, by name."""
    rw = Rewriter(gm, block.output)
    base = f"{block.path}.moe_" if block.path else "moe_"
    shared_from = mlp_provenance(block.shared) if block.shared else (None, None)
    built = (("w_gate_up", reading.w_gate_up, reading.gate_up_from), ("w_down", reading.w_down, reading.down_from),
             ("shared_gate_up", block.shared.gate_up if block.shared else None, shared_from[0]),
             ("shared_down", block.shared.down if block.shared else None, shared_from[1]),
             ("shared_gate", block.shared_gate, None))
    consts = [rw.add_constant(base + name, tensor) if tensor is not None else None for name, tensor, _ in built]
    sources = {node.target: source for node, (_, _, source) in zip(consts, built)
               if node is not None and source is not None}
    hidden = _flat(rw, block.hidden)
    if hidden.meta["val"].dtype != reading.w_gate_up.dtype:
        hidden = rw.call(aten.to.dtype, hidden, reading.w_gate_up.dtype)
    keywords = {name: rw.add_constant(base + name, value) if isinstance(value, torch.Tensor) else value
                for name, value in options(block, reading).items()}
    y = rw.call(torch.ops.sparsecc.moe.default, hidden, _flat(rw, block.routing.router), *consts,
                *_positional(block, reading), capacity_factor, **keywords)
    return _shaped_like(rw, y, block), sources


__all__ = ["Reading", "dispatch", "insert_dispatch"]
