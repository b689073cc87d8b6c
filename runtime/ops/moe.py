"""`sparsecc::moe`: a mixture-of-experts block, dispatched so each token runs only its top_k experts.

    hidden [T, H], router_logits [T, E]
    w_gate_up [E, 2I, H] (gated: rows 0..I-1 gate, I..2I-1 up; interleaved: row 2i gate i, 2i+1 up i)
              or [E, I, H], w_down [E, H, I]; b_gate_up [E, 2I|I], b_down [E, H]: optional expert biases
    shared_gate_up [2Is, H] or [Is, H], shared_down [H, Is], shared_gate [1, H]: all optional
    score_correction_bias [E]: optional, any float dtype

    routing (fp32):
    scores    = softmax(router_logits.float(), -1)   (or sigmoid)
    choice    = scores + score_correction_bias        (selection only)
    n_group > 1: experts split into n_group consecutive groups of E/n_group; a group's score is the sum
                 of its top-2 choice values; choice = -inf outside each token's best topk_group groups
    e         = topk(choice, top_k).indices;  w = scores[e]                 [T, k] each
    scoring "sparsemixer" (PhiMoE, inference; top_k = 2, no bias or groups): slot j takes the best
                 logit s[m_j] among experts not taken yet, w_j = softmax over the untaken experts i with
                 (s[m_j] - s[i]) / max(|s[i]|, s[m_j]) <= 2*sparsemixer_eps, read at m_j
    w         = w / w.sum(-1) if normalize;  w = w * routed_scaling_factor;  then cast to hidden's dtype

    experts (shared included, biases routed only):
    p         = h @ gate_up.T + b_gate_up;  gate, up = the two halves of p (or its even/odd columns)
    expert(h) = (act(gate) * up) @ down.T + b_down                   gated
              = act(p) @ down.T + b_down                             not gated
    "swiglu_clamped" (GPT-OSS, gated): g = min(gate, swiglu_limit), u = clamp(up, +-swiglu_limit),
              act(gate) * up is replaced by (u + 1) * g * sigmoid(swiglu_alpha * g)
    y[t]      = sum_j w[t, j] * expert_{e[t, j]}(hidden[t])
              + shared(hidden[t]) * sigmoid(hidden[t] @ shared_gate.T)   (shared parts when given)

top-k-then-softmax over the k logits (GraniteMoE, GPT-OSS) is softmax -> top-k -> normalize.
capacity_factor > 0: expert e keeps only its first ceil(capacity_factor*T*k/E)
(token, slot) pairs in token order; a dropped pair adds nothing. Every argument
after capacity_factor defaults to "absent" (no bias, one group, scale 1, not
interleaved; swiglu_* and sparsemixer_eps are read only by their modes), so a
13-argument call means what it always did. y has hidden's dtype. CPU tensors
run `moe_cpu`, CUDA tensors the Triton launcher. Inference only.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from ..kernels.cpu.moe import ACTIVATIONS, moe_cpu, moe_problem
from ..kernels.moe_contract import MOE_ARGUMENTS, MoECall
from .registry import OpDef


def moe_triton(*args, **kwargs) -> Tensor:
    """The Triton kernels; imported on first call so loading the op registry stays cheap."""
    from ..kernels.triton.moe import moe_triton as launch
    return launch(*args, **kwargs)


@torch.library.custom_op("sparsecc::moe", mutates_args=(), device_types="cpu")
def moe(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
        shared_gate_up: Optional[Tensor], shared_down: Optional[Tensor], shared_gate: Optional[Tensor],
        top_k: int, normalize: bool, scoring: str, activation: str, gated: bool,
        capacity_factor: float = 0.0, score_correction_bias: Optional[Tensor] = None, n_group: int = 1,
        topk_group: int = 1, routed_scaling_factor: float = 1.0, b_gate_up: Optional[Tensor] = None,
        b_down: Optional[Tensor] = None, interleaved: bool = False, swiglu_limit: float = 7.0,
        swiglu_alpha: float = 1.702, sparsemixer_eps: float = 0.01) -> Tensor:
    return moe_cpu(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                   top_k, normalize, scoring, activation, gated, capacity_factor, score_correction_bias,
                   n_group, topk_group, routed_scaling_factor, b_gate_up, b_down, interleaved,
                   swiglu_limit, swiglu_alpha, sparsemixer_eps)


moe.register_kernel("cuda")(moe_triton)


@moe.register_fake
def _(hidden, *args, **kwargs):
    return hidden.new_empty(hidden.shape)


def _reference_sparsemixer(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PhiMoE's `sparsemixer` at inference: the best logit, then the best of the rest; each weighed by a
    softmax over its pool without the experts far below it."""
    first = logits.argmax(-1, keepdim=True)
    rest = logits.scatter(-1, first, float("-inf"))
    second = rest.argmax(-1, keepdim=True)
    weights = []
    for pool, pick in ((logits, first), (rest, second)):
        top = logits.gather(-1, pick)
        far = (top - logits) / logits.abs().clamp(min=top) > 2 * eps
        weights.append(pool.masked_fill(far, float("-inf")).softmax(-1).gather(-1, pick))
    return torch.cat(weights, -1), torch.cat([first, second], -1)


def _reference_route(call: MoECall) -> tuple[Tensor, Tensor]:
    """(weights, experts) [T, k] written out as DeepSeek-V3's and PhiMoE's routers compute them."""
    logits = call.router_logits.float()
    if call.scoring == "sparsemixer":
        weights, experts = _reference_sparsemixer(logits, call.sparsemixer_eps)
    else:
        scores = logits.softmax(-1) if call.scoring == "softmax" else logits.sigmoid()
        choice = scores + (0 if call.score_correction_bias is None else call.score_correction_bias.float())
        per_group = choice.view(-1, call.n_group, choice.shape[1] // call.n_group)
        group_scores = per_group.topk(min(2, per_group.shape[-1]), -1).values.sum(-1)
        group_mask = torch.zeros_like(group_scores).scatter(1, group_scores.topk(call.topk_group, -1).indices, 1)
        choice = per_group.masked_fill(group_mask[..., None] == 0, float("-inf")).view_as(choice)
        experts = choice.topk(call.top_k, -1).indices
        weights = scores.gather(1, experts)
    weights = weights / weights.sum(-1, keepdim=True) if call.normalize else weights
    return weights * call.routed_scaling_factor, experts


def _reference_mlp(rows: Tensor, gate_up: Tensor, down: Tensor, call: MoECall, gate_up_bias=None,
                   down_bias=None) -> Tensor:
    projected = rows @ gate_up.T + (0 if gate_up_bias is None else gate_up_bias)
    if not call.gated:
        return ACTIVATIONS[call.activation](projected) @ down.T + (0 if down_bias is None else down_bias)
    if call.interleaved:
        gate, up = projected[:, 0::2], projected[:, 1::2]
    else:
        gate, up = projected.chunk(2, dim=-1)
    if call.activation == "swiglu_clamped":
        gate, up = gate.clamp(max=call.swiglu_limit), up.clamp(min=-call.swiglu_limit, max=call.swiglu_limit)
        hidden = (up + 1) * (gate * torch.sigmoid(gate * call.swiglu_alpha))
    else:
        hidden = ACTIVATIONS[call.activation](gate) * up
    return hidden @ down.T + (0 if down_bias is None else down_bias)


def moe_reference(*args, **kwargs) -> Tensor:
    """The semantics above as a loop over experts (HF Mixtral style), arguments as the op's, for tests."""
    call = MoECall(*args, **kwargs)
    hidden = call.hidden
    weights, experts = _reference_route(call)
    weights = weights.to(hidden.dtype)
    num_experts, num_pairs = call.w_down.shape[0], experts.numel()
    limit = math.ceil(call.capacity_factor * num_pairs / num_experts) if call.capacity_factor > 0 else num_pairs
    y = torch.zeros_like(hidden)
    for e in range(num_experts):
        token, slot = torch.nonzero(experts == e, as_tuple=True)  # row-major: token order
        token, slot = token[:limit], slot[:limit]
        biases = [None if b is None else b[e] for b in (call.b_gate_up, call.b_down)]
        out = _reference_mlp(hidden[token], call.w_gate_up[e], call.w_down[e], call, *biases)
        y.index_add_(0, token, out * weights[token, slot, None])
    if call.shared_down is not None:
        shared = _reference_mlp(hidden, call.shared_gate_up, call.shared_down, call)
        y = y + (shared if call.shared_gate is None else shared * torch.sigmoid(hidden @ call.shared_gate.T))
    return y


def verify_moe(*args, **kwargs) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found (shapes only: the
    kernels check the same per call, so router_logits may be a FakeTensor register)."""
    return moe_problem(*args, **kwargs)


def moe_flops(tokens: int, width: int, intermediate: int, num_experts: int, top_k: int, gated: bool,
              shared_intermediate: int = 0, shared_gate: bool = False) -> tuple[int, int]:
    """(dense FLOPs: every expert on every token, dispatch FLOPs: top_k experts per token), matmuls only.

    Both count the router (2*T*H*E) and the shared expert; padding to tiles and dropped pairs are ignored.
    """
    per_expert = 2 * width * intermediate * (3 if gated else 2)
    common = 2 * tokens * width * num_experts + tokens * 2 * width * shared_intermediate * (3 if gated else 2)
    common += 2 * tokens * width if shared_gate else 0
    return common + tokens * num_experts * per_expert, common + tokens * top_k * per_expert


def sample_moe_arguments(tokens, width, inter, num_experts, gated, shared, shared_gate, dtype=torch.float32):
    """Random arguments of `moe` (hidden, router logits, stacked expert weights, shared expert): for the
    registry's samples and tests."""
    rows = 2 if gated else 1
    w = lambda *shape: torch.randn(*shape, dtype=dtype) / math.sqrt(shape[-1])  # noqa: E731
    return (torch.randn(tokens, width, dtype=dtype), torch.randn(tokens, num_experts, dtype=dtype),
            w(num_experts, rows * inter, width), w(num_experts, width, inter),
            w(rows * inter, width) if shared else None, w(width, inter) if shared else None,
            w(1, width) if shared_gate else None)


def with_options(call: tuple, **options) -> tuple:
    """A positional call of all the op's arguments: `call` (its first 13 or more) with `options` set by name."""
    bound = replace(MoECall(*call), **options)
    return tuple(getattr(bound, name) for name in MOE_ARGUMENTS)


def _family_samples() -> list[tuple]:
    """DeepSeek-V3 (sigmoid, correction bias, groups, scaling), GPT-OSS (biases, interleaved clamped
    SwiGLU), PhiMoE (sparsemixer) forms."""
    deepseek = (*sample_moe_arguments(6, 16, 8, 8, True, True, False), 3, True, "sigmoid", "silu", True, 0.0)
    gpt_oss = (*sample_moe_arguments(5, 16, 8, 4, True, False, False), 2, True, "softmax", "swiglu_clamped", True)
    phimoe = (*sample_moe_arguments(5, 16, 8, 4, True, False, False), 2, False, "sparsemixer", "silu", True)
    return [with_options(deepseek, score_correction_bias=torch.randn(8) / 4, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5),
            with_options(gpt_oss, b_gate_up=torch.randn(4, 16), b_down=torch.randn(4, 16), interleaved=True,
                         swiglu_limit=0.5, swiglu_alpha=1.702),
            with_options(phimoe, sparsemixer_eps=0.5)]


def _samples() -> list[tuple]:
    return [(*sample_moe_arguments(6, 16, 8, 4, True, True, True), 2, True, "softmax", "silu", True, 0.0),
            (*sample_moe_arguments(5, 16, 8, 16, False, False, False), 1, False, "sigmoid", "gelu", False, 0.0),
            (*sample_moe_arguments(12, 16, 8, 4, True, True, False), 2, False, "softmax", "relu", True, 0.5),
            (*sample_moe_arguments(3, 16, 8, 4, True, False, False, dtype=torch.bfloat16), 2, True, "softmax", "silu",
             True, 0.0),
            *_family_samples()]


MOE = OpDef(name="moe", op=torch.ops.sparsecc.moe.default,
            kernels={"torch": moe_cpu, "triton": moe_triton}, verify=verify_moe, onnx_export="moe",
            attrs=("top_k", "normalize", "scoring", "activation", "gated", "capacity_factor", "n_group", "topk_group",
                   "routed_scaling_factor", "interleaved", "swiglu_limit", "swiglu_alpha", "sparsemixer_eps"),
            samples=_samples)
