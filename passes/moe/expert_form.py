"""How a block's experts compute, beyond their weight matrices: the activation, gate/up interleaving
and expert biases.

    activation    the first silu / relu / gelu in the block; or GPT-OSS's clamped SwiGLU, read from
                  `clamp(gate, max=limit)` and the `sigmoid(gate * alpha)` after it
    interleaved   gate and up are the even and odd columns of one projection (a step-2 slice)
    biases        [E, 2I] / [E, I] (gate_up) and [E, H] (down) constants the block indexes by expert
                  (never read by a linear: the router's [E, H] weight is not a bias)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from .experts import Candidate
from .regions import ACTIVATIONS, constant_of, users_through

aten = torch.ops.aten
Biases = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]   # (b_gate_up, b_down)


@dataclass(frozen=True)
class ExpertForm:
    activation: str
    interleaved: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def options(self) -> dict[str, Any]:
        """The op's expert keyword arguments that differ from their defaults."""
        found: dict[str, Any] = {"interleaved": True} if self.interleaved else {}
        if self.activation == "swiglu_clamped":
            found.update(swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha)
        return found


def read_expert_form(region: list[Node]) -> ExpertForm:
    interleaved = any(n.target is aten.slice.Tensor and len(n.args) > 4 and n.args[4] == 2 for n in region)
    clamped = _clamped_swiglu(region)
    if clamped:
        return ExpertForm("swiglu_clamped", interleaved, *clamped)
    return ExpertForm(_activation(region), interleaved)


def _activation(region: list[Node]) -> str:
    for node in region:
        if node.target in ACTIVATIONS:
            name = ACTIVATIONS[node.target]
            tanh = name == "gelu" and node.kwargs.get("approximate", "none") == "tanh"
            return "gelu_tanh" if tanh else name
    return "silu"


def _clamped_swiglu(region: list[Node]) -> Optional[tuple[float, float]]:
    """(limit, alpha) of `g = clamp(gate, max=limit); g * sigmoid(g * alpha)`, None when absent."""
    for node in region:
        if node.target is aten.clamp.default and node.args[1:2] == (None,) and len(node.args) > 2:
            for user in node.users:
                scaled = user.target is aten.mul.Tensor and isinstance(user.args[1], (int, float))
                if scaled and any(u.target is aten.sigmoid.default for u in user.users):
                    return float(node.args[2]), float(user.args[1])
    return None


def expert_biases(gm: GraphModule, region: list[Node], num_experts: int) -> list[torch.Tensor]:
    """The [E, n] constants the region reads other than through a linear: expert biases."""
    found = {}
    for node in region:
        for arg in node.all_input_nodes:
            value = constant_of(gm, arg)
            if value is not None and value.dim() == 2 and value.shape[0] == num_experts and not _read_by_linear(arg):
                found[arg.target] = value
    return list(found.values())


def _read_by_linear(const: Node) -> bool:
    return any(u.target is aten.linear.default for u in users_through(const))


def bias_pairs(biases: list[torch.Tensor], candidate: Candidate) -> list[Biases]:
    """Every (b_gate_up, b_down) assignment of `biases` that fits the candidate's shapes."""
    if not biases:
        return [(None, None)]
    rows, width = candidate.gate_up.shape[1], candidate.down.shape[1]
    ups = [b for b in biases if b.shape[1] == rows] + ([None] if len(biases) == 1 else [])
    downs = [b for b in biases if b.shape[1] == width] + ([None] if len(biases) == 1 else [])
    pairs = [(u, d) for u in ups for d in downs if u is not d and sum(b is not None for b in (u, d)) == len(biases)]
    return [(_swap_halves(u) if candidate.swapped else u, d) for u, d in pairs]


def _swap_halves(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    gate, up = bias.chunk(2, dim=1)
    return torch.cat([up, gate], 1)


__all__ = ["Biases", "ExpertForm", "bias_pairs", "expert_biases", "read_expert_form"]
