"""`sparsecc::moe`: a mixture-of-experts block, dispatched so each token runs only its top_k experts.

    hidden [T, H], router_logits [T, E]
    w_gate_up [E, 2I, H] (gated: rows 0..I-1 gate, I..2I-1 up) or [E, I, H], w_down [E, H, I]
    shared_gate_up [2Is, H] or [Is, H], shared_down [H, Is], shared_gate [1, H]: all optional

    scores    = softmax(router_logits.float(), -1)   (or sigmoid)
    w, e      = topk(scores, top_k)                  [T, k] each
    w         = w / w.sum(-1) if normalize; then cast to hidden's dtype
    expert(h) = (act(h @ gate.T) * (h @ up.T)) @ down.T   gated
              = act(h @ gate_up.T) @ down.T              not gated
    y[t]      = sum_j w[t, j] * expert_{e[t, j]}(hidden[t])
              + shared(hidden[t]) * sigmoid(hidden[t] @ shared_gate.T)   (shared parts when given)

top-k-then-softmax over the k logits equals softmax -> top-k -> normalize.
capacity_factor > 0: expert e keeps only its first ceil(capacity_factor*T*k/E)
(token, slot) pairs in token order; a dropped pair adds nothing. Experts
carry no bias (HF Mixtral, Qwen2-MoE, OLMoE). y has hidden's dtype. CPU
tensors run `moe_cpu`, CUDA tensors the Triton launcher. Inference only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..kernels.cpu.moe import ACTIVATIONS, moe_cpu, moe_problem
from .registry import OpDef


def moe_triton(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
               shared_gate_up: Optional[Tensor], shared_down: Optional[Tensor], shared_gate: Optional[Tensor],
               top_k: int, normalize: bool, scoring: str, activation: str, gated: bool,
               capacity_factor: float = 0.0) -> Tensor:
    """The Triton kernels; imported on first call so loading the op registry stays cheap."""
    from ..kernels.triton.moe import moe_triton as launch
    return launch(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                  top_k, normalize, scoring, activation, gated, capacity_factor)


@torch.library.custom_op("sparsecc::moe", mutates_args=(), device_types="cpu")
def moe(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
        shared_gate_up: Optional[Tensor], shared_down: Optional[Tensor], shared_gate: Optional[Tensor],
        top_k: int, normalize: bool, scoring: str, activation: str, gated: bool,
        capacity_factor: float = 0.0) -> Tensor:
    return moe_cpu(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                   top_k, normalize, scoring, activation, gated, capacity_factor)


moe.register_kernel("cuda")(moe_triton)


@moe.register_fake
def _(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
      top_k, normalize, scoring, activation, gated, capacity_factor=0.0):
    return hidden.new_empty(hidden.shape)


def _reference_mlp(rows: Tensor, gate_up: Tensor, down: Tensor, activation: str, gated: bool) -> Tensor:
    act = ACTIVATIONS[activation]
    if gated:
        gate, up = gate_up[: gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
        return (act(rows @ gate.T) * (rows @ up.T)) @ down.T
    return act(rows @ gate_up.T) @ down.T


def moe_reference(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                  top_k, normalize, scoring, activation, gated, capacity_factor=0.0) -> Tensor:
    """The semantics above as a loop over experts (HF Mixtral style), for tests."""
    logits = router_logits.float()
    weights, experts = (logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()).topk(top_k, -1)
    weights = (weights / weights.sum(-1, keepdim=True) if normalize else weights).to(hidden.dtype)
    num_experts, num_pairs = w_down.shape[0], experts.numel()
    limit = math.ceil(capacity_factor * num_pairs / num_experts) if capacity_factor > 0 else num_pairs
    y = torch.zeros_like(hidden)
    for e in range(num_experts):
        token, slot = torch.nonzero(experts == e, as_tuple=True)  # row-major: token order
        token, slot = token[:limit], slot[:limit]
        out = _reference_mlp(hidden[token], w_gate_up[e], w_down[e], activation, gated)
        y.index_add_(0, token, out * weights[token, slot, None])
    if shared_down is not None:
        shared = _reference_mlp(hidden, shared_gate_up, shared_down, activation, gated)
        y = y + (shared if shared_gate is None else shared * torch.sigmoid(hidden @ shared_gate.T))
    return y


def verify_moe(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
               top_k, normalize, scoring, activation, gated, capacity_factor=0.0) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found (shapes only: the
    kernels check the same per call, so router_logits may be a FakeTensor register)."""
    return moe_problem(hidden, router_logits, w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
                       top_k, normalize, scoring, activation, gated, capacity_factor)


def moe_flops(tokens: int, width: int, intermediate: int, num_experts: int, top_k: int, gated: bool,
              shared_intermediate: int = 0, shared_gate: bool = False) -> tuple[int, int]:
    """(dense FLOPs: every expert on every token, dispatch FLOPs: top_k experts per token), matmuls only.

    Both count the router (2*T*H*E) and the shared expert; padding to tiles and dropped pairs are ignored.
    """
    per_expert = 2 * width * intermediate * (3 if gated else 2)
    common = 2 * tokens * width * num_experts + tokens * 2 * width * shared_intermediate * (3 if gated else 2)
    common += 2 * tokens * width if shared_gate else 0
    return common + tokens * num_experts * per_expert, common + tokens * top_k * per_expert


def _sample(tokens, width, inter, num_experts, gated, shared, shared_gate, dtype=torch.float32):
    rows = 2 if gated else 1
    w = lambda *shape: torch.randn(*shape, dtype=dtype) / math.sqrt(shape[-1])  # noqa: E731
    return (torch.randn(tokens, width, dtype=dtype), torch.randn(tokens, num_experts, dtype=dtype),
            w(num_experts, rows * inter, width), w(num_experts, width, inter),
            w(rows * inter, width) if shared else None, w(width, inter) if shared else None,
            w(1, width) if shared_gate else None)


def _samples() -> list[tuple]:
    return [(*_sample(6, 16, 8, 4, True, True, True), 2, True, "softmax", "silu", True, 0.0),
            (*_sample(5, 16, 8, 16, False, False, False), 1, False, "sigmoid", "gelu", False, 0.0),
            (*_sample(12, 16, 8, 4, True, True, False), 2, False, "softmax", "relu", True, 0.5),
            (*_sample(3, 16, 8, 4, True, False, False, dtype=torch.bfloat16), 2, True, "softmax", "silu",
             True, 0.0)]


MOE = OpDef(name="moe", op=torch.ops.sparsecc.moe.default,
            kernels={"torch": moe_cpu, "triton": moe_triton}, verify=verify_moe, onnx_export="moe",
            attrs=("top_k", "normalize", "scoring", "activation", "gated", "capacity_factor"),
            samples=_samples)
