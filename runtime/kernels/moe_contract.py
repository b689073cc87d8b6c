"""What a `sparsecc::moe` call must satisfy, checked by the op's verifier (at every pass and at load)
and by both kernels on every call: O(1) shape, dtype and attribute checks, no data read.

Expert ids come from top_k over router_logits' E columns, so E router columns equal to the E experts
of w_gate_up and w_down (and 1 <= top_k <= E) is what makes every id index a real expert.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..moe_routing import SCORINGS


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def expert_problem(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                   gated: bool) -> Optional[str]:
    """hidden [T, H], router_logits [T, E], w_gate_up [E, 2I|I, H], w_down [E, H, I]."""
    if hidden.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0]:
        return f"hidden {_shape(hidden)} and router_logits {_shape(router_logits)} must be [T, H] and [T, E]"
    if not (hidden.dtype.is_floating_point and router_logits.dtype.is_floating_point):
        return f"hidden {hidden.dtype} and router_logits {router_logits.dtype} must be floating point"
    width, num_experts = hidden.shape[1], router_logits.shape[1]
    if w_down.dim() != 3 or w_down.shape[0] != num_experts:
        return f"w_down {_shape(w_down)} holds {w_down.shape[0] if w_down.dim() else 0} experts, router_logits " \
               f"{_shape(router_logits)} routes to E={num_experts}"
    if w_down.shape[1] != width:
        return f"w_down {_shape(w_down)} must be [E={num_experts}, H={width}, I]"
    rows = (2 if gated else 1) * w_down.shape[2]
    if _shape(w_gate_up) != [num_experts, rows, width]:
        return f"w_gate_up {_shape(w_gate_up)} must be [{num_experts}, {rows}, {width}] (gated={gated})"
    return None


def shared_problem(width: int, shared_gate_up: Optional[Tensor], shared_down: Optional[Tensor],
                   shared_gate: Optional[Tensor], gated: bool) -> Optional[str]:
    """shared_gate_up [2Is|Is, H], shared_down [H, Is], shared_gate [1, H]; all or none of the first two."""
    if shared_down is None:
        has_others = shared_gate_up is not None or shared_gate is not None
        return "shared_gate_up/shared_gate given without shared_down" if has_others else None
    if shared_gate_up is None or shared_down.dim() != 2 or shared_down.shape[0] != width:
        return f"shared expert needs shared_gate_up and shared_down [H={width}, Is]"
    rows = (2 if gated else 1) * shared_down.shape[1]
    if _shape(shared_gate_up) != [rows, width]:
        return f"shared_gate_up {_shape(shared_gate_up)} must be [{rows}, {width}] (gated={gated})"
    if shared_gate is not None and _shape(shared_gate) != [1, width]:
        return f"shared_gate {_shape(shared_gate)} must be [1, {width}]"
    return None


def attr_problem(num_experts: int, top_k: int, normalize: bool, scoring: str, activation: str, gated: bool,
                 capacity_factor: float, activations: tuple[str, ...]) -> Optional[str]:
    """1 <= top_k <= E, flags bool, scoring and activation from the fixed tables, capacity finite and >= 0."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        return f"top_k={top_k!r} must be in 1..E={num_experts}"
    if not isinstance(normalize, bool) or not isinstance(gated, bool):
        return f"normalize={normalize!r} and gated={gated!r} must be booleans"
    if scoring not in SCORINGS:
        return f"scoring {scoring!r} is not one of {', '.join(SCORINGS)}"
    if activation not in activations:
        return f"activation {activation!r} is not one of {', '.join(activations)}"
    if not isinstance(capacity_factor, (int, float)) or not math.isfinite(capacity_factor) or capacity_factor < 0:
        return f"capacity_factor={capacity_factor!r} must be finite and >= 0 (0: no limit)"
    return None


def dtype_problem(hidden: Tensor, **weights: Optional[Tensor]) -> Optional[str]:
    """Every given weight in hidden's dtype."""
    for name, t in weights.items():
        if t is not None and t.dtype != hidden.dtype:
            return f"{name} dtype {t.dtype} != hidden dtype {hidden.dtype}"
    return None
