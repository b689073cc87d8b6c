"""The arguments of one `sparsecc::moe` call (`MoECall`) and what they must satisfy, checked by the
op's verifier (at every pass and at load) and by both kernels on every call: O(1) shape, dtype and
attribute checks, no data read.

Expert ids come from top_k over router_logits' E columns, so E router columns equal to the E experts
of w_gate_up and w_down (and 1 <= top_k <= the experts the group limit keeps) is what makes every id
index a real expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from torch import Tensor

from ..moe_routing import SCORINGS

GLU_ACTIVATIONS = ("swiglu_clamped",)   # activations of (gate, up) rather than of one projection


@dataclass(frozen=True)
class MoECall:
    """One call's arguments by name, in the op's schema order (`MoECall(*args, **kwargs)` binds them)."""
    hidden: Tensor
    router_logits: Tensor
    w_gate_up: Tensor
    w_down: Tensor
    shared_gate_up: Optional[Tensor]
    shared_down: Optional[Tensor]
    shared_gate: Optional[Tensor]
    top_k: int
    normalize: bool
    scoring: str
    activation: str
    gated: bool
    capacity_factor: float = 0.0
    score_correction_bias: Optional[Tensor] = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    b_gate_up: Optional[Tensor] = None
    b_down: Optional[Tensor] = None
    interleaved: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    sparsemixer_eps: float = 0.01

    def selection(self) -> dict[str, Any]:
        """The keyword arguments `moe_routing.route` takes beyond top_k, normalize and scoring."""
        return dict(score_correction_bias=self.score_correction_bias, n_group=self.n_group,
                    topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                    sparsemixer_eps=self.sparsemixer_eps)


MOE_ARGUMENTS = tuple(f.name for f in fields(MoECall))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def expert_problem(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                   gated: bool) -> Optional[str]:
    """hidden [T, H], router_logits [T, E], w_gate_up [E, 2I|I, H], w_down [E, H, I]."""
    if hidden.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0]:
        return f"hidden {list(hidden.shape)} and router_logits {list(router_logits.shape)} must be [T, H] and [T, E]"
    if not (hidden.dtype.is_floating_point and router_logits.dtype.is_floating_point):
        return f"hidden {hidden.dtype} and router_logits {router_logits.dtype} must be floating point"
    width, num_experts = hidden.shape[1], router_logits.shape[1]
    if w_down.dim() != 3 or w_down.shape[0] != num_experts:
        return f"w_down {list(w_down.shape)} holds {w_down.shape[0] if w_down.dim() else 0} experts, router_logits " \
               f"{list(router_logits.shape)} routes to E={num_experts}"
    if w_down.shape[1] != width:
        return f"w_down {list(w_down.shape)} must be [E={num_experts}, H={width}, I]"
    rows = (2 if gated else 1) * w_down.shape[2]
    if list(w_gate_up.shape) != [num_experts, rows, width]:
        return f"w_gate_up {list(w_gate_up.shape)} must be [{num_experts}, {rows}, {width}] (gated={gated})"
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
    if list(shared_gate_up.shape) != [rows, width]:
        return f"shared_gate_up {list(shared_gate_up.shape)} must be [{rows}, {width}] (gated={gated})"
    if shared_gate is not None and list(shared_gate.shape) != [1, width]:
        return f"shared_gate {list(shared_gate.shape)} must be [1, {width}]"
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


def routing_problem(call: MoECall) -> Optional[str]:
    """score_correction_bias [E]; n_group divides E into groups of >= 2; 1 <= topk_group <= n_group;
    top_k within the kept groups' experts; a positive finite routed_scaling_factor; sparsemixer picks 2."""
    num_experts, bias = call.router_logits.shape[1], call.score_correction_bias
    if bias is not None and (list(bias.shape) != [num_experts] or not bias.dtype.is_floating_point):
        return f"score_correction_bias {list(bias.shape)} {bias.dtype} must be floating point [E={num_experts}]"
    n_group, topk_group = call.n_group, call.topk_group
    if not _int(n_group) or n_group < 1 or num_experts % n_group:
        return f"n_group={n_group!r} must be a positive divisor of E={num_experts}"
    if n_group > 1 and num_experts // n_group < 2:
        return f"n_group={n_group} leaves {num_experts // n_group} expert per group; a group's score needs 2"
    if not _int(topk_group) or not 1 <= topk_group <= n_group:
        return f"topk_group={topk_group!r} must be in 1..n_group={n_group}"
    if _int(call.top_k) and call.top_k > topk_group * (num_experts // n_group):
        return f"top_k={call.top_k} exceeds the {topk_group * (num_experts // n_group)} experts in " \
               f"topk_group={topk_group} of n_group={n_group} groups"
    if not _finite(call.routed_scaling_factor) or call.routed_scaling_factor <= 0:
        return f"routed_scaling_factor={call.routed_scaling_factor!r} must be finite and > 0"
    if not _finite(call.sparsemixer_eps) or call.sparsemixer_eps < 0:
        return f"sparsemixer_eps={call.sparsemixer_eps!r} must be finite and >= 0"
    if call.scoring == "sparsemixer" and (call.top_k != 2 or bias is not None or n_group != 1):
        return "scoring 'sparsemixer' picks exactly top_k=2 experts, without score_correction_bias or n_group"
    return None


def expert_form_problem(call: MoECall) -> Optional[str]:
    """b_gate_up [E, 2I|I], b_down [E, H]; interleaved and GLU activations need gated experts; a finite
    swiglu_limit > 0 and swiglu_alpha."""
    num_experts, rows, width = call.w_gate_up.shape[0], call.w_gate_up.shape[1], call.hidden.shape[1]
    if call.b_gate_up is not None and list(call.b_gate_up.shape) != [num_experts, rows]:
        return f"b_gate_up {list(call.b_gate_up.shape)} must be [E={num_experts}, {rows}]"
    if call.b_down is not None and list(call.b_down.shape) != [num_experts, width]:
        return f"b_down {list(call.b_down.shape)} must be [E={num_experts}, H={width}]"
    if not isinstance(call.interleaved, bool):
        return f"interleaved={call.interleaved!r} must be a boolean"
    if (call.interleaved or call.activation in GLU_ACTIVATIONS) and call.gated is not True:
        return f"interleaved={call.interleaved} with activation {call.activation!r} needs gated experts"
    if not _finite(call.swiglu_limit) or call.swiglu_limit <= 0 or not _finite(call.swiglu_alpha):
        return f"swiglu_limit={call.swiglu_limit!r} must be finite and > 0, swiglu_alpha={call.swiglu_alpha!r} finite"
    return None


def call_problem(call: MoECall, activations: tuple[str, ...]) -> Optional[str]:
    """None when the call is well formed, else the first problem (shapes, then dtypes, then attributes)."""
    problem = expert_problem(call.hidden, call.router_logits, call.w_gate_up, call.w_down, call.gated)
    problem = problem or shared_problem(call.hidden.shape[-1], call.shared_gate_up, call.shared_down,
                                        call.shared_gate, call.gated)
    problem = problem or dtype_problem(call.hidden, w_gate_up=call.w_gate_up, w_down=call.w_down,
                                       shared_gate_up=call.shared_gate_up, shared_down=call.shared_down,
                                       shared_gate=call.shared_gate, b_gate_up=call.b_gate_up, b_down=call.b_down)
    problem = problem or attr_problem(call.router_logits.shape[1], call.top_k, call.normalize, call.scoring,
                                      call.activation, call.gated, call.capacity_factor, activations)
    return problem or routing_problem(call) or expert_form_problem(call)
