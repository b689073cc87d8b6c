"""`sparsecc::moe_ep`: `sparsecc::moe` with its experts split over the ranks of a process group.

    arguments   those of sparsecc::moe, then world_size (W); the per-expert ones (EXPERT_ARGUMENTS:
                w_gate_up, w_down, b_gate_up, b_down) hold only this rank's E/W experts,
                [r*E/W, (r+1)*E/W) for rank r of the default process group (`runtime/distributed.py`);
                E is router_logits' width
    y           equal to sparsecc::moe over all E experts on this rank's hidden and router_logits

Every rank routes its own tokens, sorts the pairs by expert (so by owning rank),
sends each rank the rows of the pairs it owns with `all_to_all_single`, runs
them through its experts with the kernels of sparsecc::moe
(`kernels/cpu/moe.sorted_expert_mlp`), and gets the outputs back the same way;
weighting, scatter and the shared expert are sparsecc::moe's own
(`dispatch_moe`). The call is collective: every rank of the group must run it,
so the op is marked side-effecting (cleanup never removes it, fold-constants
never runs it). W = 1 needs no process group. Plain torch: runs on CPU (gloo)
and CUDA (NCCL) tensors alike.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from ..distributed import exchange_counts, exchange_rows, expert_range, group_rank
from ..kernels.checks import refuse
from ..kernels.cpu.moe import ExpertForm, dispatch_moe, moe_problem, sorted_expert_mlp
from ..kernels.moe_contract import MOE_ARGUMENTS, MoECall
from .moe import MOE, with_options
from .registry import OpDef

EXPERT_ARGUMENTS = ("w_gate_up", "w_down", "b_gate_up", "b_down")   # [E, ...] in moe, [E/W, ...] here


@torch.library.custom_op("sparsecc::moe_ep", mutates_args=())
def moe_ep(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
           shared_gate_up: Optional[Tensor], shared_down: Optional[Tensor], shared_gate: Optional[Tensor],
           top_k: int, normalize: bool, scoring: str, activation: str, gated: bool,
           capacity_factor: float = 0.0, score_correction_bias: Optional[Tensor] = None, n_group: int = 1,
           topk_group: int = 1, routed_scaling_factor: float = 1.0, b_gate_up: Optional[Tensor] = None,
           b_down: Optional[Tensor] = None, interleaved: bool = False, swiglu_limit: float = 7.0,
           swiglu_alpha: float = 1.702, sparsemixer_eps: float = 0.01, world_size: int = 1) -> Tensor:
    return moe_ep_kernel(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                         top_k, normalize, scoring, activation, gated, capacity_factor, score_correction_bias,
                         n_group, topk_group, routed_scaling_factor, b_gate_up, b_down, interleaved,
                         swiglu_limit, swiglu_alpha, sparsemixer_eps, world_size=world_size)


@moe_ep.register_fake
def _(hidden, *args, **kwargs):
    return hidden.new_empty(hidden.shape)


torch.fx.node.has_side_effect(torch.ops.sparsecc.moe_ep.default)   # a collective: never dead, never folded


def bind(*args: Any, **kwargs: Any) -> tuple[MoECall, int]:
    """(the moe arguments, world_size) of a moe_ep call."""
    world_size = kwargs.pop("world_size", 1)
    if len(args) > len(MOE_ARGUMENTS):
        args, world_size = args[:len(MOE_ARGUMENTS)], args[len(MOE_ARGUMENTS)]
    return MoECall(*args, **kwargs), world_size


def ep_problem(call: MoECall, world_size: Any) -> Optional[str]:
    """None when the call is a well-formed moe call whose per-expert arguments hold E/world_size experts;
    shapes and dtypes only (the global view is checked on meta tensors, nothing is read or copied)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        return f"world_size={world_size!r} must be a positive int"
    num_experts, held = call.router_logits.shape[-1], call.w_down.shape[0] if call.w_down.dim() else 0
    if num_experts % world_size or held != num_experts // world_size:
        return (f"w_down holds {held} experts; E={num_experts} over world_size={world_size} ranks needs "
                f"E % world_size == 0 and E/world_size experts per rank")
    every_expert = {name: _all_experts(getattr(call, name), world_size) for name in EXPERT_ARGUMENTS}
    return moe_problem(*(getattr(replace(call, **every_expert), name) for name in MOE_ARGUMENTS))


def _all_experts(local: Optional[Tensor], world_size: int) -> Optional[Tensor]:
    """A meta tensor shaped like the stack of every rank's `local` experts."""
    if local is None or local.dim() == 0:
        return local
    return torch.empty((local.shape[0] * world_size, *local.shape[1:]), dtype=local.dtype, device="meta")


def verify_moe_ep(*args: Any, **kwargs: Any) -> Optional[str]:
    return ep_problem(*bind(*args, **kwargs))


def exchanged_expert_mlp(rows: Tensor, tokens_per_expert: Tensor, call: MoECall, form: ExpertForm,
                         world_size: int) -> Tensor:
    """The expert outputs of `rows` (sorted by expert, `tokens_per_expert` [E] of them per expert), each
    computed on the rank holding its expert: rows out, the received ones regrouped by local expert and
    run, outputs back in the order the rows left."""
    received_per_expert = exchange_counts(tokens_per_expert, world_size)       # [W source ranks, E/W]
    send = tokens_per_expert.view(world_size, -1).sum(1).tolist()
    receive = received_per_expert.sum(1).tolist()
    received = exchange_rows(rows, send, receive)                              # by source rank, then expert
    local_expert = torch.arange(received_per_expert.shape[1], device=rows.device).repeat(world_size)
    by_expert = local_expert.repeat_interleave(received_per_expert.reshape(-1)).sort(stable=True).indices
    outputs = torch.empty_like(received)
    if received.shape[0]:
        outputs[by_expert] = sorted_expert_mlp(received[by_expert], received_per_expert.sum(0), call, form)
    return exchange_rows(outputs, receive, send)


def moe_ep_kernel(*args: Any, **kwargs: Any) -> Tensor:
    """sparsecc::moe_ep on torch tensors, arguments as the op's schema."""
    call, world_size = bind(*args, **kwargs)
    refuse("moe_ep", ep_problem(call, world_size))
    if world_size == 1:
        return dispatch_moe(call)
    group_rank(world_size)   # refuses a missing or differently sized process group
    return dispatch_moe(call, lambda rows, counts, c, form: exchanged_expert_mlp(rows, counts, c, form, world_size))


def local_experts(tensor: Tensor, world_size: int, rank: int) -> Tensor:
    """Rank `rank`'s experts of a stacked per-expert tensor [E, ...], as their own contiguous tensor."""
    start, end = expert_range(tensor.shape[0], world_size, rank)
    return tensor[start:end].clone()


def _samples() -> list[tuple]:
    """One process holds every expert: world_size 1."""
    return [(*call, 1) for call in (with_options(sample) for sample in MOE.samples())]


MOE_EP = OpDef(name="moe_ep", op=torch.ops.sparsecc.moe_ep.default,
               kernels={"torch": moe_ep_kernel, "triton": moe_ep_kernel}, verify=verify_moe_ep,
               attrs=(*MOE.attrs, "world_size"), samples=_samples)
