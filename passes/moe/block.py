"""An MoE block as moe-dispatch reads it: where it is, how it routes, how its experts compute."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from .expert_form import ExpertForm
from .experts import Candidate
from .regions import MLPWeights
from .routing import Routing


@dataclass
class MoEBlock:
    path: str
    nodes: list[Node]                  # made inside the block's module, graph order
    selection: Node                    # the router's topk (or the sparsemixer's first max)
    routing: Routing
    hidden: Node                       # the router's input: the tokens [.., H]
    output: Node                       # the block's result, replaced by the dispatch
    form: str                          # grouped_mm | batched_mm | loop | dense
    expert_candidates: list[Candidate]  # (w_gate_up [E,.,H], w_down [E,H,I], gated, swapped)
    expert_form: ExpertForm
    biases: list[torch.Tensor] = field(default_factory=list)   # expert biases [E, n], not yet assigned
    shared: Optional[MLPWeights] = None
    shared_gate: Optional[torch.Tensor] = None
    sources: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.expert_candidates[0].gate_up.shape[0]

    @property
    def layer(self) -> str:
        return self.path


__all__ = ["MoEBlock"]
